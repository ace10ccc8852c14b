"""Strict JSON for every file and line distcls writes: a non-finite float (NaN, +-Inf: a diverged
loss, an empty split's mean) becomes `null`, never the `NaN`/`Infinity` tokens Python's json
emits by default, which strict parsers (JavaScript, jq, most languages) refuse."""
from __future__ import annotations

import json
import math


def finite_or_none(value):
    """`value` with every non-finite float (also inside dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """json.dumps with null for non-finite floats; anything non-finite left over is an error, not invalid JSON."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
