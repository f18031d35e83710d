"""What a command may write, replace and lock: the guarantees "nothing outside --out is written or deleted" and
"a command replaces only what it wrote itself", in one place for every `ctr` command that takes `--out`.

Every output directory a command owns carries a marker file it wrote itself:

    dataset directory   manifest.json       (`ctr build`)
    run directory       config.json         (`ctr train`; holds "run_name" and "data_dir")
    raw directory       source.json         (`ctr generate`, `ctr import`)
    report directory    report.md           (`ctr report`)
    demo directory      demo.json           (`ctr demo`)

`claim_output_dir` lets a command write into a directory that does not exist, is empty, or holds its own marker
(and then only with `overwrite`); anything else is an error that names the directory and what it holds.
`check_no_overlap` refuses an output equal to, inside, or a parent of an input. `DirLock` is an exclusive,
non-blocking lock file (flock: released by the kernel when the holder dies, even by SIGKILL), so two builds into
one `--out` or two trainings into one run directory cannot interleave.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path
from types import TracebackType

from .errors import UserError

LOCK_PREFIX = ".lock"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class OutputError(UserError):
    """An output path that a command refuses to write (it would touch what the command did not write)."""


def check_identifier(name: str, where: str) -> str:
    """A name from data that becomes part of a path must be a plain identifier (no '/', '..', spaces)."""
    if not isinstance(name, str) or not IDENTIFIER.match(name):
        raise OutputError(
            f"{where}: column name {name!r} is not an identifier ([A-Za-z_][A-Za-z0-9_]*); it would become part of "
            "a file name. How to fix: rename the column in the raw table"
        )
    return name


def ensure_under(path: Path | str, root: Path | str) -> Path:
    """`path` resolved, checked to lie inside `root` (resolved); an OutputError otherwise."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and r not in p.parents:
        raise OutputError(f"{p}: refusing to write outside the output directory {r}")
    return p


def check_no_overlap(out: Path | str, inputs: dict[str, Path | str | None], flag: str = "--out") -> None:
    """Refuse an output directory equal to, inside, or a parent of any input directory."""
    o = Path(out).resolve()
    for name, inp in inputs.items():
        if inp is None:
            continue
        i = Path(inp).resolve()
        if o == i:
            relation = "is"
        elif i in o.parents:
            relation = "is inside"
        elif o in i.parents:
            relation = "contains"
        else:
            continue
        raise OutputError(
            f"{flag} {o} {relation} the {name} {i}: writing there could replace the input. "
            f"How to fix: choose an {flag} outside {i}"
        )


def claim_output_dir(out: Path | str, marker: str, *, overwrite: bool, what: str, flag: str = "--overwrite") -> bool:
    """May a command that writes `what` (marked by `marker`) replace `out`? Returns True when `out` exists and is
    to be replaced, False when it does not exist or is empty; raises OutputError otherwise."""
    o = Path(out)
    if not o.exists() and not o.is_symlink():
        return False
    if not o.is_dir():
        raise OutputError(f"{o}: exists and is not a directory. How to fix: choose another output path")
    entries = sorted(p.name for p in o.iterdir() if not p.name.startswith(LOCK_PREFIX))  # our own lock files
    if not entries:
        return False
    if marker not in entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(
            f"{o}: exists and is not a {what} (no {marker}; it holds {shown}); nothing there is replaced. "
            "How to fix: choose an empty or new output directory"
        )
    if not overwrite:
        raise OutputError(f"{o}: a {what} is already there. How to fix: pass {flag} to replace it, or choose another")
    return True


class DirLock:
    """An exclusive lock on `<dir>/<name>` (flock), taken without waiting: a second holder gets an OutputError.

    The lock file itself stays (it is empty); the kernel drops the lock when the process exits, however it exits.
    """

    def __init__(self, path: Path | str, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputError(
                    f"{self.path}: another process is writing this {self.what} now (the lock is held). "
                    "How to fix: wait for it to finish, or choose another output"
                ) from None
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
