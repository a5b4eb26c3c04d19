"""JSON from clients, parsed with a bound on nesting (REST bodies and socket messages alike).

The depth is measured on the raw text before parsing: the parser itself would
recurse (and raise RecursionError on deep enough input), and a measure of the
parsed value would miss whatever it drops, such as a repeated key's first value.
So every field counts, the ignored ones included.
"""

import json
import re
from typing import Any

from . import errors
from .errors import ScopeError

MAX_JSON_DEPTH = 32

# The only characters that open, close or escape anything in JSON.
_STRUCTURAL = re.compile(r'[\[\]{}"\\]')


class JSONTooDeep(ValueError):
    pass


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects in ``text`` nest deeper than ``limit``; one linear pass, strings skipped."""
    depth = 0
    in_string = False
    escaped_at = -1  # the position a backslash inside a string escapes
    for match in _STRUCTURAL.finditer(text):
        at, char = match.start(), match.group()
        if at == escaped_at:
            continue
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def loads(text: str) -> Any:
    """``json.loads`` for client text: ValueError if nested deeper than MAX_JSON_DEPTH, or not strict JSON."""
    if json_depth_exceeds(text):
        raise JSONTooDeep(f"JSON nested deeper than {MAX_JSON_DEPTH} levels.")
    # parse_constant: NaN and Infinity are not JSON (DRF's parser refuses them too).
    return json.loads(text, parse_constant=_refuse_constant)


def parse_json_message(text: str) -> Any:
    """A signaling message's JSON; INVALID_MESSAGE if it is not JSON or nests too deep."""
    try:
        return loads(text)
    except JSONTooDeep as exc:
        raise ScopeError(errors.INVALID_MESSAGE, str(exc)) from exc
    except ValueError as exc:  # JSONDecodeError, NaN, or an integer too long to convert
        raise ScopeError(errors.INVALID_MESSAGE, f"Not JSON: {getattr(exc, 'msg', exc)}.") from exc
