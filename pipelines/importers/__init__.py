"""Importers of public datasets into the raw contract of `features.schema` (`ctr import NAME SRC --out RAW_DIR`).

Each importer is `import_<name>(src, out_dir, **options) -> summary dict` and writes RAW_DIR/items.parquet,
behaviors.parquet, impressions.parquet and source.json (plus import_rejects.csv when some input rows could not be
parsed). `IMPORTERS` maps the CLI names to them; `PROTOCOLS` gives each one's sample protocol in one paragraph.
The protocols respect the builder's rule: a sample sees only behaviors strictly before its ts (ties are after).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.importers import amazon, movielens, taobao_mm, taobao_userbehavior
from pipelines.importers._common import ImportSourceError
from pipelines.importers.amazon import import_amazon
from pipelines.importers.movielens import import_movielens
from pipelines.importers.taobao_mm import import_taobao_mm
from pipelines.importers.taobao_userbehavior import import_taobao_userbehavior

IMPORTERS: dict[str, Callable[..., dict[str, Any]]] = {
    taobao_mm.NAME: import_taobao_mm,
    amazon.NAME: import_amazon,
    taobao_userbehavior.NAME: import_taobao_userbehavior,
    movielens.NAME: import_movielens,
}

PROTOCOLS: dict[str, str] = {
    taobao_mm.NAME: taobao_mm.PROTOCOL,
    amazon.NAME: amazon.PROTOCOL,
    taobao_userbehavior.NAME: taobao_userbehavior.PROTOCOL,
    movielens.NAME: movielens.PROTOCOL,
}

__all__ = [
    "IMPORTERS",
    "PROTOCOLS",
    "ImportSourceError",
    "import_amazon",
    "import_movielens",
    "import_taobao_mm",
    "import_taobao_userbehavior",
]
