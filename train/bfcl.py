"""Function calling in BFCL's format: data, prompts, training targets, parsing, AST scoring.

Data are JSON lines in the format of the Berkeley Function Calling Leaderboard (BFCL) with the
ground truth inline, one example a line::

  {"id": "simple_python_0",
   "question": [[{"role": "user", "content": "Find the area of a triangle ..."}]],
   "function": [{"name": "calculate_triangle_area", "description": "...",
                 "parameters": {"type": "dict", "properties": {...}, "required": [...]}}],
   "ground_truth": [{"calculate_triangle_area": {"base": [10], "height": [5],
                                                 "unit": ["units", ""]}}]}

``question`` is a list of turns, each a list of chat messages; the messages of every turn are
read as one conversation. ``ground_truth`` is BFCL's possible-answer format: one entry per
expected call, mapping the function's name to ``{argument: [acceptable values]}``; an argument is
optional when its acceptable values include ``""``.

The conversation given to the model (:func:`conversation`) starts with a system message that
lists the functions as JSON (:func:`system_prompt`); the assistant answers with a JSON list of
calls, ``[{"name": ..., "arguments": {...}}]``. The training target (:func:`target_calls`) takes
the first acceptable value of every argument and leaves out the optional ones (a required
argument of the function's schema is kept even when BFCL marks it optional).

Scoring (:func:`check`) follows BFCL's AST checker for Python (``bfcl_eval`` 2026.3.23,
``eval_checker/ast_eval/ast_checker.py``), reimplemented here:

* the number of calls must equal the number of expected calls; expected calls are matched in
  order, each to the first unmatched call that satisfies it (so parallel calls may come in any
  order);
* a call satisfies an expected one when its name is the expected name, every argument the
  function's schema requires is present, every argument it gives is in the schema and in the
  expected ones, its value is acceptable, and every expected argument it leaves out is optional;
* types come from the schema (``string`` str, ``integer`` int, ``float`` float, ``boolean``
  bool, ``array``/``tuple`` list, ``dict`` dict, ``any`` str), compared exactly (``True`` is not
  an integer) except that an integer is accepted for a ``float``; a value of the acceptable
  values' own type is accepted when those differ from the schema's (BFCL's "variable" case, e.g.
  a string naming a variable), and then compared as is; list elements are checked against the
  schema's ``items`` type, one level deep, the same way (without the float rule);
* strings are compared after BFCL's normalisation: spaces and ``, . / - _ * ^`` removed,
  lower case, ``'`` as ``"``; also inside lists and as dict values;
* a schema type outside that table (BFCL's checker fails on one) is not checked, and the value
  must equal an acceptable one;
* a dict value must match one acceptable dict (its keys among the expected keys, each value
  acceptable, the expected keys it lacks optional); a list of dicts, one acceptable list
  element by element; anything else must equal an acceptable value (Python's ``==``).

:func:`default_split` builds the default data from the ``bfcl-eval==2026.3.23`` wheel on PyPI
(fetched once, the 8 files checked by SHA-256): the single-turn categories with ground truth,
``simple_python`` (400), ``multiple`` (200), ``parallel`` (200) and ``parallel_multiple`` (200),
1,000 examples; an example is held out when the SHA-256 of its id, read as a big-endian integer,
is divisible by 10 (:func:`is_held_out`; 92 of the 1,000: 38 simple_python, 21 multiple,
12 parallel, 21 parallel_multiple).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import tempfile
import zipfile
from typing import Any, Iterable, Optional, Sequence

from train import fetch

BFCL_REQUIREMENT = "bfcl-eval==2026.3.23"
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple")
# SHA-256 of the wheel's files: questions, then possible answers, per category.
_BFCL_SHA256 = {
    "bfcl_eval/data/BFCL_v4_simple_python.json":
        "82dd63ba502eb2520c6b5d1d9a5c4b590e03ff261565175561f6228a367d1991",
    "bfcl_eval/data/BFCL_v4_multiple.json":
        "aef168155ebd74b7ac2401198b201343bc7d16d7a3d7e0d4e6d8ee82c6969b2a",
    "bfcl_eval/data/BFCL_v4_parallel.json":
        "19f51a82eff42e5d62541aa500115a056eb78f437c2ba1f10415fd7c8e5dda84",
    "bfcl_eval/data/BFCL_v4_parallel_multiple.json":
        "8863ea8433239f55c5f016154cf0830853c89f693c6ea270396a2fa121960579",
    "bfcl_eval/data/possible_answer/BFCL_v4_simple_python.json":
        "90cd5bc653690ee8e459b5b3f3fc9458606f7f3fcbf795bb51b7dc581f8c86dc",
    "bfcl_eval/data/possible_answer/BFCL_v4_multiple.json":
        "244e00ce9395df948bcafc7bee64e8f9c87ef70887587d83cae45b13699f3047",
    "bfcl_eval/data/possible_answer/BFCL_v4_parallel.json":
        "8a6aa19c1adddc6a5a2f7e40f9dbf30cc7e95815e7b830c90589ab318229e0f0",
    "bfcl_eval/data/possible_answer/BFCL_v4_parallel_multiple.json":
        "5ebf24f458c1f16300c05505d83d6f0a1b68b79be273a033febd0d4f840507e3",
}
DEFAULT_FILENAME = "bfcl_v4_single_turn.jsonl"
HELD_OUT_MODULUS = 10

FIELDS = ("id", "question", "function", "ground_truth")

SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible "
    "functions. Based on the question, call one or more of the functions to achieve the "
    "purpose. Answer with the calls only, as a JSON list: "
    '[{"name": "function_name", "arguments": {"argument": value}}].\n\n'
    "The functions, as JSON schemas:\n")


class DataError(ValueError):
  """A data file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One function-calling example.

  Attributes:
    id: the example's id.
    messages: the question's chat messages (every turn's, in order).
    functions: the JSON-schema function specs.
    ground_truth: BFCL's possible answers, ``[{name: {argument: [values]}}]``.
  """

  id: str
  messages: tuple[dict[str, str], ...]
  functions: tuple[dict[str, Any], ...]
  ground_truth: tuple[dict[str, dict[str, list[Any]]], ...]


def _example(record: Any, where: str) -> Example:
  """An :class:`Example` from one parsed line; ``DataError`` naming ``where`` if malformed."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  missing = [field for field in FIELDS if field not in record]
  if missing:
    raise DataError(f"{where}: missing field {', '.join(repr(f) for f in missing)}"
                    f" (each line needs {', '.join(FIELDS)})")
  question, functions, truth = record["question"], record["function"], record["ground_truth"]
  if not (isinstance(question, list) and question
          and all(isinstance(turn, list) for turn in question)):
    raise DataError(f"{where}: 'question' must be a non-empty list of turns (lists of messages)")
  messages = [m for turn in question for m in turn]
  if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                             and isinstance(m.get("content"), str) for m in messages):
    raise DataError(f"{where}: every message of 'question' must be "
                    '{"role": str, "content": str}')
  if not (isinstance(functions, list) and functions
          and all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions)):
    raise DataError(f"{where}: 'function' must be a non-empty list of function specs with names")
  if not (isinstance(truth, list) and truth and all(
      isinstance(call, dict) and len(call) == 1
      and all(isinstance(args, dict) and all(isinstance(v, list) for v in args.values())
              for args in call.values()) for call in truth)):
    raise DataError(f"{where}: 'ground_truth' must be a non-empty list of "
                    "{function name: {argument: [acceptable values]}}")
  names = {f["name"] for f in functions}
  for call in truth:
    (name,) = call
    if name not in names:
      raise DataError(f"{where}: 'ground_truth' calls {name!r}, which 'function' does not define")
  return Example(str(record["id"]), tuple({"role": m["role"], "content": m["content"]}
                                          for m in messages),
                 tuple(functions), tuple(truth))


def read_examples(path: str | os.PathLike) -> list[Example]:
  """Reads a JSON-lines file of examples (blank lines skipped).

  Raises:
    FileNotFoundError: no such file.
    DataError: a line that is not JSON or lacks a field; the message is one line naming the
      file and line number.
  """
  path = pathlib.Path(path)
  examples = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      examples.append(_example(record, where))
  if not examples:
    raise DataError(f"{path}: no examples")
  return examples


def is_held_out(example_id: str) -> bool:
  """The default split's rule: SHA-256 of the id (UTF-8), as an integer, divisible by 10.

  Examples:
    >>> [i for i in range(40) if is_held_out(f"simple_python_{i}")]
    [2, 17, 20]
  """
  digest = hashlib.sha256(example_id.encode("utf-8")).digest()
  return int.from_bytes(digest, "big") % HELD_OUT_MODULUS == 0


def split(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
  """``(train, held_out)`` by :func:`is_held_out`."""
  train = [e for e in examples if not is_held_out(e.id)]
  held_out = [e for e in examples if is_held_out(e.id)]
  return train, held_out


def _read_lines(data: bytes) -> list[dict[str, Any]]:
  return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def fetch_default(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The default data file in the cache, built from the ``bfcl-eval`` wheel on first use.

  The wheel is downloaded with ``pip download --no-deps`` into a temporary directory; its 4
  categories' questions and possible answers are checked against recorded SHA-256 sums and joined
  by id into one JSON-lines file (ground truth inline), ``data/bfcl-eval-2026.3.23/`` in the
  cache. The wheel is deleted.

  Raises:
    FetchError: the wheel could not be downloaded.
    ValueError: a file is missing from the wheel or has another SHA-256.
  """
  name = BFCL_REQUIREMENT.replace("==", "-")
  path = fetch.resolve_cache_dir(cache_dir) / "data" / name / DEFAULT_FILENAME
  if path.is_file():
    return path
  with tempfile.TemporaryDirectory(prefix="ngalore-pip-") as tmp:
    wheel = fetch.pip_download(BFCL_REQUIREMENT, pathlib.Path(tmp), sdist=False)
    files = {}
    try:
      with zipfile.ZipFile(wheel) as zf:
        for member, digest in _BFCL_SHA256.items():
          files[member] = zf.read(member)
          got = fetch.sha256_bytes(files[member])
          if got != digest:
            raise ValueError(f"{member} from {BFCL_REQUIREMENT} has SHA-256 {got}, "
                             f"expected {digest}")
    except (KeyError, zipfile.BadZipFile) as e:
      raise ValueError(f"{wheel.name} does not hold the BFCL data: {e}") from None
  lines = []
  for category in CATEGORIES:
    questions = _read_lines(files[f"bfcl_eval/data/BFCL_v4_{category}.json"])
    answers = {a["id"]: a["ground_truth"] for a in _read_lines(
        files[f"bfcl_eval/data/possible_answer/BFCL_v4_{category}.json"])}
    for question in questions:
      record = {"id": question["id"], "question": question["question"],
                "function": question["function"], "ground_truth": answers[question["id"]]}
      lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  fetch.write_atomic(path, "".join(lines).encode("utf-8"))
  return path


def default_split(cache_dir: str | os.PathLike | None = None
                  ) -> tuple[list[Example], list[Example]]:
  """``(train, held_out)`` of the default data (:func:`fetch_default`, :func:`is_held_out`)."""
  return split(read_examples(fetch_default(cache_dir)))


# Prompts and targets.


def system_prompt(functions: Sequence[dict[str, Any]]) -> str:
  """The system message: the instructions and the functions as a JSON list."""
  return SYSTEM_PROMPT + json.dumps(list(functions), ensure_ascii=False)


def conversation(example: Example) -> list[dict[str, str]]:
  """The chat messages the model sees: the system prompt, then the question.

  A system message of the question's own goes after the function list, in the same message.
  """
  system = system_prompt(example.functions)
  messages = []
  for message in example.messages:
    if message["role"] == "system":
      system += "\n\n" + message["content"]
    else:
      messages.append(dict(message))
  return [{"role": "system", "content": system}] + messages


def _required(functions: Sequence[dict[str, Any]], name: str) -> set[str]:
  spec = find_function(functions, name)
  return set((spec or {}).get("parameters", {}).get("required", []) or [])


def _is_answer_dict(value: Any) -> bool:
  return isinstance(value, dict) and all(isinstance(v, list) for v in value.values())


def _first_values(answers: dict[str, list[Any]], required: set[str]) -> dict[str, Any]:
  """``{key: first acceptable value}``, optional keys left out unless ``required``.

  A dict value is itself in possible-answer form (``{key: [values]}``, as BFCL's checker reads
  it), and so is each dict of a list of dicts: they are reduced the same way.
  """
  chosen = {}
  for key, values in answers.items():
    if "" in values:
      if key not in required:
        continue
      values = [v for v in values if not (isinstance(v, str) and v == "")]
      if not values:
        continue
    value = values[0]
    if _is_answer_dict(value):
      value = _first_values(value, set())
    elif isinstance(value, list) and value and all(_is_answer_dict(v) for v in value):
      value = [_first_values(v, set()) for v in value]
    chosen[key] = value
  return chosen


def target_calls(example: Example) -> list[dict[str, Any]]:
  """The training answer: each expected call with its arguments' first acceptable values.

  Optional arguments (acceptable values include ``""``) are left out unless the function's
  schema requires them; then their first non-empty value is used. Dict-typed values are written
  the same way from their own possible answers.
  """
  calls = []
  for expected in example.ground_truth:
    (name, arguments), = expected.items()
    calls.append({"name": name,
                  "arguments": _first_values(arguments, _required(example.functions, name))})
  return calls


def target_text(example: Example) -> str:
  """The assistant's answer as text: ``json.dumps`` of :func:`target_calls`."""
  return json.dumps(target_calls(example), ensure_ascii=False)


# Parsing the model's answer.

_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


def _as_calls(value: Any) -> Optional[list[dict[str, Any]]]:
  """``value`` as a list of ``{"name", "arguments"}`` calls, or ``None``."""
  if isinstance(value, dict):
    value = [value]
  if not isinstance(value, list):
    return None
  calls = []
  for item in value:
    if not isinstance(item, dict):
      return None
    if "name" in item:
      name, arguments = item.get("name"), item.get("arguments", item.get("parameters", {}))
    elif len(item) == 1:  # BFCL's own {name: {arguments}}
      (name, arguments), = item.items()
    else:
      return None
    if isinstance(arguments, str):
      try:
        arguments = json.loads(arguments)
      except json.JSONDecodeError:
        return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
      return None
    calls.append({"name": name, "arguments": arguments})
  return calls


def parse_calls(text: str) -> Optional[list[dict[str, Any]]]:
  """The calls in a model's answer, or ``None`` if it holds none that parse.

  Accepts the JSON list alone, inside a markdown code fence, or with text around it (the first
  JSON list or object that parses as calls is taken); a single call object is read as a list of
  one; ``"arguments"`` may be a JSON string, and BFCL's ``{name: {arguments}}`` form is read too.

  Examples:
    >>> parse_calls('Sure!\\n```json\\n[{"name": "f", "arguments": {"x": 1}}]\\n```')
    [{'name': 'f', 'arguments': {'x': 1}}]
    >>> parse_calls('{"name": "f", "arguments": "{\\\\"x\\\\": 2}"} done')
    [{'name': 'f', 'arguments': {'x': 2}}]
    >>> parse_calls("I cannot help with that.") is None
    True
  """
  candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
  decoder = json.JSONDecoder()
  for candidate in candidates:
    candidate = candidate.strip()
    try:
      calls = _as_calls(json.loads(candidate))
      if calls is not None:
        return calls
    except json.JSONDecodeError:
      pass
    for start, char in enumerate(candidate):
      if char not in "[{":
        continue
      try:
        value, _ = decoder.raw_decode(candidate, start)
      except json.JSONDecodeError:
        continue
      calls = _as_calls(value)
      if calls is not None:
        return calls
  return None


# BFCL's AST rules.

PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
                "tuple": list, "dict": dict, "any": str}
_NORMALISED = re.compile(r"[ ,./\-_*^]")


def normalise(text: str) -> str:
  """BFCL's string normalisation: drop spaces and ``, . / - _ * ^``, lower case, ``'`` -> ``"``.

  Examples:
    >>> normalise("April 1, 2024") == normalise("april 1,2024")
    True
  """
  return _NORMALISED.sub("", text).lower().replace("'", '"')


def find_function(functions: Iterable[dict[str, Any]], name: str) -> Optional[dict[str, Any]]:
  for spec in functions:
    if spec.get("name") == name:
      return spec
  return None


def _answer_type(values: Sequence[Any]) -> Optional[type]:
  """The type of the first acceptable value that is not ``""`` (the optional marker)."""
  for value in values:
    if value != "" or not isinstance(value, str):
      return type(value)
  return None


def _type_ok(value: Any, values: Sequence[Any], expected: Optional[type],
             items: Optional[type]) -> tuple[bool, bool]:
  """``(acceptable type, is a "variable")`` by BFCL's type rules (module doc)."""
  answer_type = _answer_type(values)
  variable = answer_type is not None and answer_type is not expected
  if expected is None:  # a schema type outside BFCL's table: no type rule
    return True, True
  if type(value) is expected:  # pylint: disable=unidiomatic-typecheck
    if items is None:
      return True, variable
    for candidate in values:
      if not isinstance(candidate, list) or all(
          _type_ok(element, candidate, items, None)[0] for element in value):
        return True, variable
    return False, variable
  if answer_type is not None and type(value) is answer_type:  # pylint: disable=unidiomatic-typecheck
    return True, True
  return False, variable


def _normalised_value(value: Any) -> Any:
  return normalise(value) if isinstance(value, str) else value


def _dict_ok(value: dict, values: Sequence[Any]) -> bool:
  for candidate in values:
    if candidate == "" or not isinstance(candidate, dict):
      continue
    if all(key in candidate and _normalised_value(item) in
           [_normalised_value(v) for v in candidate[key]] for key, item in value.items()) and all(
               key in value or "" in accepted for key, accepted in candidate.items()):
      return True
  return False


def _list_of_dicts_ok(value: list, values: Sequence[Any]) -> bool:
  for candidate in values:
    candidate = [] if candidate == "" else candidate
    if (isinstance(candidate, list) and len(candidate) == len(value)
        and all(isinstance(item, dict) and _dict_ok(item, [expected])
                for item, expected in zip(value, candidate))):
      return True
  return False


def _list_ok(value: list, values: Sequence[Any]) -> bool:
  normalised = [_normalised_value(v) for v in value]
  for candidate in values:
    candidate = [] if candidate == "" else candidate
    if isinstance(candidate, list) and normalised == [_normalised_value(v) for v in candidate]:
      return True
  return False


def check_call(call: dict[str, Any], spec: Optional[dict[str, Any]], name: str,
               expected: dict[str, list[Any]]) -> tuple[bool, str]:
  """Whether one call satisfies one expected call; ``(ok, reason)``."""
  if call.get("name") != name:
    return False, f"function {call.get('name')!r} is not {name!r}"
  if spec is None:
    return False, f"no function spec named {name!r}"
  arguments = call.get("arguments", {})
  parameters = spec.get("parameters", {})
  properties = parameters.get("properties", {})
  for required in parameters.get("required", []) or []:
    if required not in arguments:
      return False, f"{name}: missing required argument {required!r}"
  for argument, value in arguments.items():
    if argument not in properties or argument not in expected:
      return False, f"{name}: unexpected argument {argument!r}"
    values = expected[argument]
    schema = properties[argument]
    kind = schema.get("type")
    target = PYTHON_TYPES.get(kind)
    items = None
    if kind in ("array", "tuple"):
      items = PYTHON_TYPES.get(schema.get("items", {}).get("type"))
    if kind == "float" and type(value) is int:  # pylint: disable=unidiomatic-typecheck
      value = float(value)
    type_ok, variable = _type_ok(value, values, target, items)
    if not type_ok:
      return False, f"{name}: argument {argument!r} has type {type(value).__name__}, not {kind}"
    if not variable:
      if target is dict:
        ok = _dict_ok(value, values)
      elif target is list and items is dict:
        ok = _list_of_dicts_ok(value, values)
      elif target is str:
        ok = normalise(value) in [normalise(v) for v in values if isinstance(v, str)]
      elif target is list:
        ok = _list_ok(value, values)
      else:
        ok = value in values
    else:
      ok = value in values
    if not ok:
      return False, f"{name}: argument {argument!r} = {value!r} is not one of {values!r}"
  for argument, values in expected.items():
    if argument not in arguments and "" not in values:
      return False, f"{name}: missing argument {argument!r}"
  return True, ""


def check(calls: Optional[Sequence[dict[str, Any]]], functions: Sequence[dict[str, Any]],
          ground_truth: Sequence[dict[str, dict[str, list[Any]]]]) -> tuple[bool, str]:
  """Scores parsed calls against BFCL's possible answers; ``(correct, reason if not)``.

  Examples:
    >>> spec = {"name": "area", "parameters": {"type": "dict", "properties": {
    ...     "base": {"type": "float"}, "unit": {"type": "string"}}, "required": ["base"]}}
    >>> truth = [{"area": {"base": [10.0], "unit": ["cm", ""]}}]
    >>> check([{"name": "area", "arguments": {"base": 10}}], [spec], truth)
    (True, '')
    >>> check([{"name": "area", "arguments": {"base": 10, "unit": "CM"}}], [spec], truth)
    (True, '')
    >>> check([{"name": "area", "arguments": {"base": 11}}], [spec], truth)[0]
    False
  """
  if calls is None:
    return False, "no calls could be parsed"
  if len(calls) != len(ground_truth):
    return False, f"{len(calls)} calls, expected {len(ground_truth)}"
  matched: set[int] = set()
  for expected in ground_truth:
    (name, arguments), = expected.items()
    spec = find_function(functions, name)
    reason = f"no call of {name!r}"
    for index, call in enumerate(calls):
      if index in matched:
        continue
      ok, why = check_call(call, spec, name, arguments)
      if ok:
        matched.add(index)
        break
      reason = why
    else:
      return False, reason
  return True, ""


def check_example(calls: Optional[Sequence[dict[str, Any]]], example: Example) -> bool:
  """:func:`check` against an example's functions and ground truth."""
  return check(calls, example.functions, example.ground_truth)[0]
