"""Strict, bounded JSON for anything that crosses a trust boundary (ledger rows, kept heads, proofs,
enrollment requests, receipts, uploads' JSON).

Python's :func:`json.loads` accepts ``NaN``/``Infinity`` (not JSON), lets a later duplicate key win
silently, and recurses once per nesting level, so a 100,000-deep document ends in ``RecursionError``
(an "internal error" wherever it is not caught). :func:`loads` refuses all of these with one
:class:`~medadv.errors.MedadvError`, and measures the depth with a linear scan *before* parsing, so
nothing recurses on hostile input.
"""

from __future__ import annotations

import json
import re
from typing import Any

from medadv.errors import MedadvError

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_DEPTH = 64


_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (one regex pass over strings and brackets, no
    recursion). An unterminated string simply ends the scan: json.loads refuses that document anyway."""
    depth = deepest = 0
    for m in _TOKENS.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:40]!r}")
        out[k] = v
    return out


def loads(data: str | bytes | bytearray, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH,
          what: str = "the JSON", fix: str = "pass the file medadv wrote, unedited.") -> Any:
    """Parse ``data`` (text, or UTF-8 bytes) as strict JSON.

    Raises :class:`MedadvError` ("``what`` is not valid JSON (why)." / ``fix``) when it is larger than
    ``max_bytes`` (UTF-8 bytes), nests deeper than ``max_depth``, holds NaN/Infinity/-Infinity, repeats
    a key in one object, is not UTF-8, or is not JSON at all.
    """
    def bad(why: str) -> MedadvError:
        return MedadvError(f"{what} is not valid JSON ({why}).", fix)

    if isinstance(data, (bytes, bytearray)):
        if len(data) > max_bytes:
            raise bad(f"{len(data)} bytes, more than the {max_bytes} allowed")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise bad("not UTF-8") from None
    elif isinstance(data, str):
        text = data
        # a str's UTF-8 size is at most 4 bytes per character: encode only when it might be too large
        if len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            raise bad(f"more than the {max_bytes} bytes allowed")
    else:
        raise bad(f"a {type(data).__name__}, not text")
    # no scan needed when there are too few brackets to nest that deep (every short ledger row)
    depth = _depth(text) if text.count("[") + text.count("{") > max_depth else 0
    if depth > max_depth:
        raise bad(f"nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique)
    except (ValueError, RecursionError) as exc:
        raise bad(str(exc)[:80]) from None
