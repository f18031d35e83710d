"""`python -m ctr.native`: build the native CPU operators now (`make setup` does) and say whether they load."""

import logging

from . import _build_flags, load, unavailable_reason

logging.basicConfig(level=logging.INFO, format="%(message)s")
ok = load(verbose=False)
name, flags = _build_flags()
state = "loaded" if ok else f"unavailable: {unavailable_reason()}"
print(f"native CPU operators ({name}, {' '.join(flags)}): {state}")  # noqa: T201  (the module's command-line output)
