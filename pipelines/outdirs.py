"""How the pipeline commands (`ctr generate`, `ctr import`, `ctr build`) claim, lock, stage and publish `--out`.

The policy (see `features.outputs` for the markers and the shared checks):

* **build** writes the dataset into a sibling `.NAME.tmp-XXXXXXXX`, publishes it by one rename, and replaces an
  existing `--out` only when it holds `manifest.json` (or is empty), and only with `--overwrite`. It holds an
  `OutputLock` (`.NAME.lock` beside `--out`) from before it looks at `--out` until it has published: a second build
  into the same `--out` fails at once with a clear message; and whoever holds the lock knows that every
  `.NAME.tmp-*` / `.NAME.old-*` sibling was left by a build that is gone (killed, crashed), so it removes them.
* **generate** and **import** write a raw directory in place. They may write into a directory that does not exist,
  is empty, or holds `source.json` (a raw directory that `ctr generate` or `ctr import` wrote before): then they
  replace exactly the names in `RAW_OUTPUTS` and leave anything else there alone. Before removing or writing
  anything they put a placeholder `source.json` with `"incomplete": true`; the final `source.json` replaces it as the
  last write. So an interrupted generate/import leaves a directory that the next generate/import may replace, and
  that `ctr build` refuses (`check_raw_complete`) instead of building from half the tables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.outputs import DirLock, check_no_overlap, claim_output_dir

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
INCOMPLETE_KEY = "incomplete"
RAW_WHAT = "raw directory (written by ctr generate or ctr import)"
# Every name `ctr generate` or `ctr import` may write into RAW_DIR. Only these are replaced when a raw directory is
# written again; nothing else there is touched.
RAW_OUTPUTS = (
    "items.parquet",
    "items",
    "behaviors.parquet",
    "behaviors",
    "impressions.parquet",
    "impressions",
    SOURCE_FILE,
    "import_rejects.csv",
    "id_map.parquet",
    ".import_tmp",
)
_TMP_SUFFIX = ".tmp"


def _abs(path: Path | str) -> Path:
    """Absolute, without resolving a symlink (the link itself is what gets renamed or replaced)."""
    return Path(os.path.abspath(Path(path).expanduser()))


class OutputLock(DirLock):
    """The lock of one output directory `out`: `<parent>/.<name>.lock`, held while a command writes `out`.

    Unlike a plain `DirLock` the lock file is removed again on release (nothing is left beside `out`). That is safe
    because `acquire` checks, once it holds the flock, that the path still names the file it locked (a process that
    opened the file just before the previous holder removed it would otherwise hold a lock on a deleted file).
    """

    def __init__(self, out: Path | str, what: str) -> None:
        out = _abs(out)
        super().__init__(out.parent / f".{out.name}.lock", what)

    def acquire(self) -> OutputLock:
        while True:
            super().acquire()
            assert self._fd is not None
            held = os.fstat(self._fd)
            try:
                on_disk = os.stat(self.path)
                current = (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                return self
            super().release()  # the previous holder removed the file we opened: lock the new one

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still holding the flock: see the class docstring
        super().release()

    def __enter__(self) -> OutputLock:
        return self.acquire()


def sibling(out: Path | str, kind: str) -> Path:
    """A new, unique sibling path of `out` for staging (`kind` "tmp") or the replaced generation ("old")."""
    out = _abs(out)
    return out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}"


def clean_stale_siblings(out: Path | str) -> list[Path]:
    """Remove the `.NAME.tmp-*` and `.NAME.old-*` siblings of `out`. Call only while holding `OutputLock(out)`:
    then no live writer of `out` exists, so every such sibling was left by one that was killed or crashed."""
    out = _abs(out)
    if not out.parent.is_dir():
        return []
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    removed = []
    for p in sorted(out.parent.iterdir()):
        if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink():
            log.warning("removing %s, left by an interrupted write of %s", p, out)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs: Any) -> None:
    """Write `table` to `path` through a hidden temporary file and `os.replace`: a reader (or a retried Ray task that
    races a lost one) sees either no file or a whole one, never a truncated one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        pq.write_table(table, tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def sweep_tmp_files(root: Path) -> int:
    """Remove the temporary files of `write_parquet_atomic` that killed task attempts left under `root`."""
    n = 0
    for p in root.rglob(f".*{_TMP_SUFFIX}"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


# --------------------------------------------------------------------------------------------------------------------
# raw directories (ctr generate, ctr import)
# --------------------------------------------------------------------------------------------------------------------
def prepare_raw_dir(out_dir: str | Path, writer: str, inputs: dict[str, Path | str | None] | None = None) -> Path:
    """Claim RAW_DIR for `writer` ("ctr generate", "ctr import NAME"): it must not overlap `inputs`, and must not
    exist, be empty, or hold `source.json`. Marks it incomplete, removes the previous outputs (`RAW_OUTPUTS` only)
    and returns its absolute path. The writer ends with writing the real `source.json`."""
    out = _abs(out_dir)
    check_no_overlap(out, inputs or {}, "--out")
    claim_output_dir(out, SOURCE_FILE, overwrite=True, what=RAW_WHAT)
    out.mkdir(parents=True, exist_ok=True)
    placeholder = {
        INCOMPLETE_KEY: True,
        "writer": writer,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": f"{writer} started writing this raw directory and has not finished; run it again",
    }
    (out / SOURCE_FILE).write_text(json.dumps(placeholder, indent=2) + "\n")
    for name in RAW_OUTPUTS:
        p = out / name
        if name == SOURCE_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    return out


def read_source(raw_dir: Path) -> dict[str, Any] | None:
    """RAW_DIR/source.json (None when absent); a DataError when it is unreadable or marks an unfinished write."""
    from pipelines.validate import data_error

    path = raw_dir / SOURCE_FILE
    if not path.exists():
        return None
    try:
        source = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise data_error(
            str(path), f"not readable JSON ({exc})", "write the raw directory again (ctr generate / ctr import)"
        ) from None
    if not isinstance(source, dict):
        raise data_error(str(path), "expected a JSON object", "write the raw directory again")
    if source.get(INCOMPLETE_KEY):
        writer = source.get("writer", "ctr generate / ctr import")
        raise data_error(
            str(raw_dir),
            f"the raw directory is incomplete: {writer} started writing it and did not finish",
            f"run {writer} into it again",
        )
    return source


# --------------------------------------------------------------------------------------------------------------------
# the demo directory (ctr demo)
# --------------------------------------------------------------------------------------------------------------------
DEMO_MARKER = "demo.json"


def prepare_demo_dir(out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Claim `ctr demo --out`: new, empty, or an earlier demo's directory (demo.json); write demo.json first.

    The demo then writes raw/, data/, runs/NAME/ and report/ through the rules of generate, build, train and report:
    each replaces only what that command wrote there before.
    """
    out = _abs(out_dir)
    claim_output_dir(out, DEMO_MARKER, overwrite=True, what="demo directory (written by ctr demo)")
    out.mkdir(parents=True, exist_ok=True)
    marker = {"command": "ctr demo", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    (out / DEMO_MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
    return out
