"""Range checks for numeric options, done where a value enters (an entry point's config, a public function's
argument), so a bad value is refused with its config key before any work starts."""

import logging
import math
import numbers

log = logging.getLogger(__name__)


def check_number(key: str, value, low=None, high=None, integer: bool = False, allow_none: bool = False):
    """`value` when it is a number (an integer when `integer`) in [low, high] (either bound may be None); else a
    ValueError naming `key`, the value and the range. None passes only with `allow_none`."""
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f">= {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    wanted = kind + (" " + " and ".join(bounds) if bounds else "")
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or (integer and not isinstance(value, numbers.Integral)) or not math.isfinite(value):
        raise ValueError(f"{key}={value!r}: must be {wanted}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{key}={value!r}: must be {wanted}")
    return value


def clip_count(key: str, value: int, available: int, what: str) -> int:
    """`value` capped at `available`, with a warning naming both numbers when it is capped."""
    if value > available:
        log.warning(f"{key}={value} is more than the {available} {what}; using {key}={available}")
        return available
    return value
