"""Boolean environment variables of tf_fastattn: one rule for all of them.

`0/1`, `false/true`, `no/yes`, `off/on` in any case (and unset or empty for
the default); anything else is refused with a ValueError naming the variable
when tf_fastattn is imported, rather than read as on or off silently. (The
C++ kernels read TF_FASTATTN_CPU_AMX with the same words.)
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# name: (default, what it does)
FLAGS = {
    "TF_FASTATTN_DISABLE_OPS": (False, "use the pure-TensorFlow reference instead of the op library"),
    "TF_FASTATTN_DISABLE_XLA": (False, "do not load the XLA kernels (code traced for XLA gets the reference math)"),
    "TF_FASTATTN_CPU_AMX": (True, "run the CPU attention's bfloat16 products on AMX tiles where the CPU has them"),
}


def flag(name: str) -> bool:
    """The value of boolean environment variable `name` (one of FLAGS)."""
    default = FLAGS[name][0]
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean: expected one of "
                     f"{', '.join(_FALSE)} (off) or {', '.join(_TRUE)} (on), any case; unset for the default "
                     f"({'on' if default else 'off'}: {FLAGS[name][1]})")


def check_flags() -> None:
    """Raises ValueError for the first boolean variable holding another word."""
    for name in FLAGS:
        flag(name)
