"""Process groups and sharded state: one process or N workers through torch.distributed (gloo on CPU, nccl on GPU).

`launch(fn, nproc, ...)` runs `fn(ctx, ...)` in N spawned workers that meet through a file store in the run
directory (no port to pick). Under `torchrun` (RANK / WORLD_SIZE in the environment) it joins that job instead.
A single process still gets a 1-rank group, so the same DistributedModelParallel code path runs everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from features.errors import UserError
from features.procs import die_with_parent

log = logging.getLogger(__name__)


@contextmanager
def serial_collective_copies() -> Iterator[None]:
    """Run a gloo collective whose tensor copies happen on gloo's worker threads with one intra-op thread.

    Why: ATen sets each thread's OpenMP team size at that thread's first parallel op, from the process-wide thread
    count. A gloo worker thread that copies a large tensor (a gather's output, an object collective's bytes) while
    that count is N > 1 keeps its own OpenMP team of N for the life of the process group; libgomp then sees more
    threads than CPUs and stops spinning between parallel regions in *every* team, so each op of every later
    training step wakes its workers through the kernel: measured 20-25% slower steps for the rest of the run on 2
    cores (voluntary context switches 6 -> 364 per step), after the first validation's export. With the count at
    1 while the collective runs, the worker thread initializes to 1 thread and never starts a team.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_int(self, value: int, op: str) -> int:
        """`value` reduced over ranks with op "min", "max" or "sum"."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
        return int(t.item())

    def all_reduce_float(self, value: float) -> float:
        """The sum of `value` over ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with serial_collective_copies():
            dist.all_gather_object(out, obj)
        return out if self.is_main else None

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        with serial_collective_copies():
            dist.broadcast_object_list(box, src=0)
        return box[0]


def _init(rank: int, world_size: int, init_method: str | None) -> DistContext:
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": "nccl" if cuda else "gloo", "rank": rank, "world_size": world_size}
        if init_method:
            kwargs["init_method"] = init_method
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, world_size=world_size, device=device)


class WorkerError(UserError):
    """An expected failure inside a training process (a config or data problem found by a rank), or a rank that was
    killed; the message names the rank and, for a kill, the signal."""


def _worker(rank: int, world_size: int, init_method: str, error_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rank == 0:  # our progress on rank 0 only; TorchRec/FBGEMM INFO chatter stays off
        for ours in ("ctr", "features"):
            logging.getLogger(ours).setLevel(logging.INFO)
    try:
        ctx = _init(rank, world_size, init_method)
        try:
            fn(ctx, *args)
        finally:
            dist.destroy_process_group()
    except UserError as exc:  # the parent turns it into one line, not a traceback per rank
        Path(error_dir, f"rank{rank}.json").write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise


def _stop(processes: list[Any]) -> None:
    """Terminate, then kill, every process still alive (a failed or interrupted multi-process run)."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _run_ranks(fn: Callable[..., Any], nproc: int, init_method: str, error_dir: Path, args: tuple) -> None:
    """Spawn the ranks and wait; on any failure (a rank's exception, a rank killed, SIGTERM/Ctrl-C here) stop the
    others, then raise: a WorkerError when the cause is known (a UserError in a rank, a signal)."""
    context = mp.start_processes(
        _worker, args=(nproc, init_method, str(error_dir), fn, args), nprocs=nproc, join=False, start_method="spawn"
    )
    try:
        while not context.join():
            pass
    except mp.ProcessRaisedException as exc:
        _stop(context.processes)
        errors = sorted(error_dir.glob("rank*.json"))
        if errors:
            first = json.loads(errors[0].read_text())
            raise WorkerError(f"{errors[0].stem}: {first['message']}") from exc
        raise
    except mp.ProcessExitedException as exc:
        _stop(context.processes)
        # torch reports a rank killed by a signal as a negative exit code (and the signal's name)
        killed = exc.exit_code is not None and exc.exit_code < 0
        if killed:
            name = exc.signal_name or signal.Signals(-exc.exit_code).name
        else:
            name = f"exit code {exc.exit_code}"
        hint = " (the kernel's OOM killer sends SIGKILL when memory runs out)" if name == "SIGKILL" else ""
        raise WorkerError(
            f"training process rank {exc.error_index} was stopped by {name}{hint}; the other ranks were stopped too. "
            "How to fix: find the cause, then continue with --resume (from the last complete checkpoint)"
        ) from exc
    except BaseException:
        _stop(context.processes)
        raise


def launch(fn: Callable[..., Any], nproc: int, rendezvous_dir: Path, *args: Any) -> None:
    """Run `fn(ctx, *args)` on `nproc` ranks (or join a torchrun job when RANK/WORLD_SIZE are set)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        ctx = _init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None)
        try:
            fn(ctx, *args)
        finally:
            dist.destroy_process_group()
        return
    rendezvous_dir.mkdir(parents=True, exist_ok=True)
    store = rendezvous_dir.resolve() / ".dist_store"
    if store.exists():
        store.unlink()
    error_dir = rendezvous_dir / ".dist_errors"
    shutil.rmtree(error_dir, ignore_errors=True)
    error_dir.mkdir()
    # an absolute file:/// URL: with a relative run dir, "file://out/demo/..." would name a host "out"
    init_method = store.as_uri()
    try:
        if nproc == 1:
            ctx = _init(0, 1, init_method)
            try:
                fn(ctx, *args)
            finally:
                dist.destroy_process_group()
        else:
            _run_ranks(fn, nproc, init_method, error_dir, args)
    finally:
        if store.exists():
            store.unlink()
        shutil.rmtree(error_dir, ignore_errors=True)
        shutil.rmtree(rendezvous_dir / ".dist_tmp", ignore_errors=True)


# ---- sharded state ---------------------------------------------------------------------------------------------


def _is_sharded(t: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(t, ShardedTensor)


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def full_state_dict(module: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The whole model's weights as plain CPU tensors on rank 0 (sharded tables gathered); None on other ranks.

    Collective: every rank must call it. The result loads into the unsharded model (same keys), so evaluation and
    export do not depend on how many workers trained it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in module.state_dict().items():
        if _is_sharded(t) and ctx.world_size == 1:
            out[key] = _assemble_local(t)  # every shard is here: no collective (see serial_collective_copies)
        elif _is_sharded(t):
            with warnings.catch_warnings():  # "ShardedTensor is deprecated": it is what TorchRec 1.8 hands us
                warnings.simplefilter("ignore", FutureWarning)
                full = torch.empty(t.size(), dtype=t.dtype) if ctx.is_main else None
                with serial_collective_copies():
                    t.gather(dst=0, out=full)
            if ctx.is_main:
                out[key] = full  # type: ignore[assignment]
        elif _is_dtensor(t):
            full_t = t.full_tensor().cpu()
            if ctx.is_main:
                out[key] = full_t
        elif ctx.is_main:
            out[key] = t.detach().cpu().clone()
    return out if ctx.is_main else None


def _assemble_local(t: Any) -> torch.Tensor:
    """A ShardedTensor whose shards are all on this rank as one plain CPU tensor (what `gather` would give)."""
    full = torch.empty(t.size(), dtype=t.dtype)
    covered = 0
    for shard in t.local_shards():
        md = shard.metadata
        index = tuple(slice(o, o + n) for o, n in zip(md.shard_offsets, md.shard_sizes, strict=True))
        full[index].copy_(shard.tensor.detach())
        covered += shard.tensor.numel()
    if covered != full.numel():
        raise RuntimeError(
            f"sharded tensor of size {tuple(t.size())}: local shards cover {covered} of {full.numel()} "
            "elements on a 1-rank group"
        )
    return full


def local_state(obj: Any) -> Any:
    """A state dict with every ShardedTensor replaced by a copy of this rank's local shards (for per-rank saves)."""
    if _is_sharded(obj):
        return [s.tensor.detach().cpu().clone() for s in obj.local_shards()]
    if _is_dtensor(obj):
        return obj.to_local().detach().cpu().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: local_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(local_state(v) for v in obj)
    return obj


def copy_local_state(live: Any, saved: Any, where: str = "") -> None:
    """Copy a `local_state` snapshot back into the live tensors it was taken from (in place)."""
    if _is_sharded(live):
        for shard, tensor in zip(live.local_shards(), saved, strict=True):
            shard.tensor.copy_(tensor)
    elif _is_dtensor(live):
        live.to_local().copy_(saved)
    elif isinstance(live, torch.Tensor):
        live.copy_(saved)
    elif isinstance(live, dict):
        missing = set(live) ^ set(saved)
        if missing:
            raise ValueError(f"checkpoint does not match the model at {where or '<root>'}: keys {sorted(missing)[:5]}")
        for k in live:
            copy_local_state(live[k], saved[k], f"{where}.{k}" if where else str(k))
    elif isinstance(live, list | tuple):
        for i, (a, b) in enumerate(zip(live, saved, strict=True)):
            copy_local_state(a, b, f"{where}[{i}]")
