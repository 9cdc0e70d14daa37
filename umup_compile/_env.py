"""The only place that reads the environment: ``UMUP_COMPILE``."""

from __future__ import annotations

import os

_VALUES = {
    "": None,
    "1": True,
    "true": True,
    "0": False,
    "false": False,
    "strict": "strict",
}


def compile_from_env() -> bool | str | None:
    """Return the engine choice forced by ``UMUP_COMPILE``, or ``None`` if unset.

    Read when an optimizer is built, not at import, so tests and scripts can set it.

    Raises:
        ValueError: an unknown value (the accepted ones are listed).
    """
    raw = os.environ.get("UMUP_COMPILE", "")
    key = raw.strip().lower()
    if key not in _VALUES:
        raise ValueError(
            f"UMUP_COMPILE={raw!r} is not understood; use one of 0, 1, false, true, "
            "strict, or leave it unset."
        )
    return _VALUES[key]
