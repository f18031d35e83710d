"""What the model test modules share: one torch thread, the tiny dataset, cached training batches, a seeded build.

The fixtures `info` (the tiny dataset, or ``$CTR_TEST_MODELS_DATA`` to skip its build while iterating) and
`one_thread` live in conftest.py; a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import torch

from ctr.models import get_model_class
from features.loader import Batch, DatasetInfo, LoaderConfig, SplitLoader

STEPS = 30


_BATCHES: dict[tuple, list[Batch]] = {}


def batches(info: DatasetInfo, model, n: int = STEPS) -> list[Batch]:
    """The first `n` shuffled training batches of 256 for this model's views and features (cached)."""
    key = (str(info.data_dir), model.views(), tuple(model.features()))
    if key not in _BATCHES or len(_BATCHES[key]) < n:
        loader = SplitLoader(
            info, "train", LoaderConfig(batch_size=256, views=model.views(), shuffle=True), model.features()
        )
        _BATCHES[key] = [b for _, b in zip(range(n), loader, strict=False)]
    return _BATCHES[key][:n]


def build(info: DatasetInfo, name: str, seed: int = 0, **params):
    """Model `name` with `params` over `info`, initialized under `seed`."""
    torch.manual_seed(seed)
    cls = get_model_class(name)
    return cls(cls.Params(**params), info)
