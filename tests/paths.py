"""Where the tests find the real data samples (`shared/data` beside the checkout; `$LIFELONG_CTR_SHARED_DATA`
overrides). Tests that need them skip when they are absent, saying where they looked."""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = [
    os.environ.get("LIFELONG_CTR_SHARED_DATA"),
    str(Path(__file__).resolve().parents[2] / "shared" / "data"),
    "/work/shared/data",
]
SHARED_DATA = next((Path(c) for c in _CANDIDATES if c and Path(c).is_dir()), Path(_CANDIDATES[1]))
