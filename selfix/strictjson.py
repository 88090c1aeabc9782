"""Strict JSON: RFC 8259 in UTF-8, nothing guessed. Tasks, job files and control messages are parsed only by
`strict_loads` (a NaN or a duplicate key would otherwise reach ComfyUI, or the runner, with a guessed meaning).

Pure and without selfix imports, so the spool (job files) and the messages module (tasks) can both use it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a candidate only: pairs are fine, checked after parsing
_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"), (b"\xef\xbb\xbf", "UTF-8"),
         (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16"))  # UTF-32 first: its LE BOM starts like UTF-16's


class StrictJSONError(ValueError):
    """Not RFC 8259 JSON in UTF-8; the message says what is wrong, never echoing more than a short excerpt."""


def strict_loads(raw: bytes | str) -> Any:
    """Parse RFC 8259 JSON, strictly. Bytes must be UTF-8 without a BOM: no encoding is guessed.

    Refused besides what the json module refuses: NaN/Infinity/-Infinity, numbers that overflow a float (1e400
    would become inf), integers over CPython's digit limit, lone surrogates (a "\\ud800" escape decodes to one,
    and no UTF-8 encoder can write it back), and duplicate object keys (RFC 8259 leaves their meaning open;
    parsers disagree on which one wins, so a task that says two things is refused instead of guessed).
    """
    text = _utf8_text(raw) if isinstance(raw, bytes) else raw
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except StrictJSONError:
        raise
    except RecursionError:
        raise StrictJSONError("JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int()'s "Exceeds the limit (4300 digits)"
        if "integer string conversion" in str(exc):
            raise StrictJSONError(f"an integer has more than {sys.get_int_max_str_digits()} digits") from None
        raise StrictJSONError(f"not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):  # only an escape can produce a lone surrogate: valid UTF-8 holds none
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StrictJSONError(f"a string holds a lone surrogate ({exc.object[exc.start:exc.end]!r}): "
                                  "not a Unicode character") from None
    return obj


def _utf8_text(raw: bytes) -> str:
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise StrictJSONError(f"text must be UTF-8 without a byte order mark, this starts with a {name} BOM")
    if b"\x00" in raw[:4]:  # RFC 4627's detection: JSON text starts with ASCII, so NULs mean UTF-16/32
        raise StrictJSONError("text must be UTF-8; this looks like UTF-16 or UTF-32")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"text is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})") from None


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON value (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJSONError(f"duplicate key {key[:60]!r} in one object")
            seen.add(key)
    return obj
