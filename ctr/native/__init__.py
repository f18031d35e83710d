"""Native CPU operators, compiled on first use: Dice in fused passes (`dice.cpp`); DIEN's GRU recurrences, a row at
a time (`gru_scan.cpp`, `ctr.modules.gru_scan`); the soft search's relevance-weighted pooling over a jagged prefix
(`dot_pool.cpp`, `ctr.modules.gsu.InnerProductGSU.pooled`); softmax attention over a few tokens per row
(`token_attention.cpp`, DiffuMIN's `ctr.modules.diffusion.TokenSelfAttention`); the GSU's top-K over a jagged prefix
(`jagged_topk.cpp`, `gsu_topk`), its scores, each behavior read once in place (`gather_dot.cpp`), SDIM's bucket
match (`simhash.cpp`, `ctr.modules.hashing`); masked multi-head target attention over a sample's slots
(`target_attention.cpp`: SIM's, R2LED's and TWIN's ESUs, the ``mhta`` short branch) and over jagged rows
(`attention_rows.cpp`, `attention_rows` here: TWIN's and ETA's ESUs at `fits_k`); TWIN-V2's hierarchical k-means of
a history block (`kmeans_tree.cpp`, `pipelines.cluster`); the sum of rows by index, the backward of every row gather,
the sparse update's per-row sum and its look-ups' places (`index_add.cpp`, `gather_rows`, `index_add_rows`,
`cpu_tables`); DIN's activation unit with
Dice in cache-sized blocks (`din_unit.cpp`, its autograd function in `ctr.native.activation_unit`, `din_unit` here,
`DinAttention.scores`) and the weighted sum after it (`weighted_pool.cpp`, `weighted_pool`, `forward_rows`).

Eager PyTorch runs Dice (DIN's activation, on every real behavior of a batch in the activation unit) as about ten
elementwise passes forward and twenty backward over [N, H] blocks, each through memory: on 2 cores that was half of
DIN's activation unit. `dice.cpp` does the forward in a pass of column sums and a pass of outputs and the backward in
a pass of sums and a pass of input gradients (`benchmarks/native_ops.py` measures both forms side by side).

The operators are built with `torch.utils.cpp_extension` (g++ and ninja, both set up by `make setup`) the first time
a process needs them, into torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``;
a few seconds, once per machine and source), and loaded from there afterwards. Where they cannot be built (no
compiler) or ``LIFELONG_CTR_NATIVE=0`` is set, every caller runs its eager PyTorch form instead, with one warning
for a failed build: the results agree to float rounding either way (`tests/test_native.py`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

ENV = "LIFELONG_CTR_NATIVE"
ISA_ENV = "LIFELONG_CTR_NATIVE_ISA"  # at most this instruction set (`_build_flags`)
HERE = Path(__file__).resolve().parent
SOURCES = (
    HERE / "dice.cpp",
    HERE / "gru_scan.cpp",
    HERE / "dot_pool.cpp",
    HERE / "token_attention.cpp",
    HERE / "jagged_topk.cpp",
    HERE / "kmeans_tree.cpp",
    HERE / "gather_dot.cpp",
    HERE / "target_attention.cpp",
    HERE / "index_add.cpp",
    HERE / "din_unit.cpp",
    HERE / "weighted_pool.cpp",
    HERE / "attention_rows.cpp",
    HERE / "simhash.cpp",
    HERE / "next_dots.cpp",
)
HEADERS = (HERE / "vec_math.h", HERE / "dice_rows.h", HERE / "unit_first_layer.h")
STALE_LOCK_S = 600.0
_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None
_use = True  # set_enabled(): an in-process switch for A/B measurements


def set_enabled(on: bool) -> None:
    """Use the native operators where they apply (True, the default) or the eager forms (False), in this process."""
    global _use
    _use = bool(on)


def enabled_by_env() -> bool:
    """False when ``LIFELONG_CTR_NATIVE`` is 0/false/off (the eager forms everywhere, e.g. for an A/B run)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _build_flags() -> tuple[str, list[str]]:
    """The extension's name and compiler flags: vector instructions by the CPU torch itself dispatches to (AVX-512,
    AVX2 or none), or fewer with ``LIFELONG_CTR_NATIVE_ISA=avx2`` or ``generic`` (an A/B of the instruction sets on
    one machine: ``benchmarks/step_ab.py --before-env LIFELONG_CTR_NATIVE_ISA=avx2``).

    The name carries the instruction set, so a cache shared by machines of different CPUs keeps one build each.
    """
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]  # the last two let the loops vectorize
    capability = "generic"
    if platform.machine().lower() in ("x86_64", "amd64"):
        cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT"
        ceiling = os.environ.get(ISA_ENV, "").strip().lower()
        if ceiling not in ("", "avx512", "avx2", "generic"):
            raise ValueError(f"{ISA_ENV}={ceiling!r}: expected avx512, avx2 or generic (or unset: the CPU's)")
        if ceiling == "generic":
            cap = "DEFAULT"
        elif ceiling == "avx2" and cap == "AVX512":
            cap = "AVX2"
        if cap in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma"]
            capability = "avx2"
        if cap == "AVX512":  # the tiles of DIN's unit's first layer in 16-float registers (unit_first_layer.h)
            flags += ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]
            capability = "avx512"
    return f"ctr_native_{capability}", flags


def _build_directory(name: str) -> Path:
    """``<torch's extension root>/<name>-torch<version>-<digest>`` (a torch upgrade or an edit builds anew), without
    a stale lock.

    torch serializes concurrent builds of one extension with a ``lock`` file in this directory and waits for it
    without end; a build killed midway (Ctrl-C on the first run) would leave it behind. A build takes seconds, so a
    lock older than `STALE_LOCK_S` is removed.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    # torch rebuilds when a source file changes but not a header: the sources' and headers' digest names the build
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))).hexdigest()[:10]
    path = root / f"{name}-torch{torch.__version__.replace('+', '_')}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing a stale build lock %s (a build was killed)", lock)
            lock.unlink()
    except FileNotFoundError:
        pass
    return path


def _unity_sources(directory: Path, parts: int | None = None) -> list[str]:
    """The sources as ``parts`` translation units (one per core, at most one per source), each a file in
    ``directory`` that includes its share of `SOURCES` (balanced by size).

    Every source parses ATen's and torch's registration headers, about 13 s of a core each; five sources on a 2-core
    machine spent most of a 40 s build doing that. Grouped, the headers are parsed once per core. The sources keep
    their own names in the compiler's messages (they are included by absolute path), and each still compiles alone.
    """
    parts = max(1, min(len(SOURCES), parts or os.cpu_count() or 1))
    if parts == len(SOURCES):
        return [str(s) for s in SOURCES]
    groups: list[list[Path]] = [[] for _ in range(parts)]
    sizes = [0] * parts
    for source in sorted(SOURCES, key=lambda f: (-f.stat().st_size, f.name)):
        i = sizes.index(min(sizes))
        groups[i].append(source)
        sizes[i] += source.stat().st_size
    files = []
    for i, group in enumerate(groups):
        unit = directory / f"unity_{i}.cpp"
        text = "".join(f'#include "{source}"\n' for source in sorted(group))
        if not unit.exists() or unit.read_text() != text:  # an unchanged unit keeps torch from rebuilding
            # whole or not at all: a process building meanwhile (the demo's jobs) never reads a half-written unit
            tmp = unit.with_name(f".{unit.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, unit)
        files.append(str(unit))
    return files


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a virtualenv's own (the `ninja` package, a dependency) is not on it unless the
    virtualenv is activated: its folder is added then."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-untyped]
        except ImportError:
            return
        os.environ["PATH"] = str(ninja.BIN_DIR) + os.pathsep + os.environ.get("PATH", "")


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the operators; True when ``torch.ops.ctr_native`` is usable. Never raises."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if not enabled_by_env():
            _loaded, _error = False, f"{ENV}=0"
            return False
        try:
            from torch.utils.cpp_extension import load as cpp_load

            name, flags = _build_flags()
            _ninja_on_path()
            directory = _build_directory(name)
            cpp_load(
                name, _unity_sources(directory), extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), is_python_module=False, verbose=verbose,
            )  # fmt: skip
            _loaded = hasattr(torch.ops.ctr_native, "dice_forward")
        except Exception as e:  # no compiler, no ninja, a failed build: the eager forms, said once
            lines = str(e).strip().splitlines()
            said = [ln.strip() for ln in lines if "error" in ln.lower() and "Error building" not in ln]
            said = said[:3] or lines[-1:]  # the compiler's first errors, else the last line
            _loaded, _error = False, f"{type(e).__name__}: {' | '.join(said)}"
            log.warning("native CPU operators unavailable (%s); running their eager PyTorch forms", _error)
    return bool(_loaded)


def available() -> bool:
    """Whether the native operators are loaded (building them if needed)."""
    return load()


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or was not asked yet)."""
    return _error


def applies(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors runs natively: all float32 on the CPU, outside `torch.compile`, switched on
    (`set_enabled`) and built (`available`)."""
    return (
        _use and not torch.compiler.is_compiling()
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and available()
    )  # fmt: skip


class _DiceBatchStats(torch.autograd.Function):
    """Dice with batch statistics: ``x (α + (1 − α) σ((x − mean) · invstd))``, mean and invstd those of x's columns.

    ``mean`` and ``invstd`` arrive computed (without autograd); the backward includes their dependence on x, as a
    batch norm's does."""

    @staticmethod
    def forward(ctx, x, alpha, mean, invstd):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, alpha, mean, invstd)
        return torch.ops.ctr_native.dice_forward(x, alpha, mean, invstd)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, alpha, mean, invstd = ctx.saved_tensors
        dx, dalpha = torch.ops.ctr_native.dice_backward(grad.contiguous(), x, alpha, mean, invstd)
        return dx, dalpha, None, None


def dice(x: torch.Tensor, alpha: torch.Tensor, norm: torch.nn.BatchNorm1d) -> torch.Tensor | None:
    """Dice over the rows of ``x [N, H]`` with ``norm``'s statistics, natively; None where the caller must run eager.

    Training (``norm.training``): batch statistics (biased variance in the output, unbiased into the running
    variance, ``momentum`` and ``num_batches_tracked`` as `nn.BatchNorm1d` updates them); evaluation: the running
    statistics, forward only (None when a gradient is needed). Native only for float32 CPU tensors, more than one
    row, a BatchNorm without affine parameters that tracks running statistics with a fixed momentum, outside
    `torch.compile` (which fuses the eager form itself).
    """
    if (
        x.dim() != 2 or norm.affine or not norm.track_running_stats or norm.momentum is None
        or norm.running_mean is None or norm.running_var is None or not applies(x, alpha)
    ):  # fmt: skip
        return None
    x = x.contiguous()
    n = x.size(0)
    if norm.training:
        if n < 2:
            return None  # one row has no variance: the module's own rule (BatchNorm1dAnySize)
        with torch.no_grad():
            sums = torch.ops.ctr_native.dice_column_sums(x.detach())  # float64 [2, H]
            mean64 = sums[0] / n
            var64 = (sums[1] / n - mean64 * mean64).clamp_min_(0.0)
            m = float(norm.momentum)
            norm.running_mean.mul_(1.0 - m).add_(mean64.to(norm.running_mean.dtype), alpha=m)
            norm.running_var.mul_(1.0 - m).add_((var64 * (n / (n - 1))).to(norm.running_var.dtype), alpha=m)
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)
            mean = mean64.float()
            invstd = (var64 + norm.eps).rsqrt().float()
        return _DiceBatchStats.apply(x, alpha.contiguous(), mean, invstd)
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return None
    invstd = (norm.running_var.float() + norm.eps).rsqrt()
    return torch.ops.ctr_native.dice_forward(x, alpha.contiguous(), norm.running_mean.float().contiguous(), invstd)


class _DotPool(torch.autograd.Function):
    """``pooled_b = Σ_n <k_n, q_b> v_n`` over each sample's jagged rows (`dot_pool.cpp`); ``same``: keys are values."""

    @staticmethod
    def forward(ctx, keys, values, q, offsets, same):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(keys, values, q, offsets)
        ctx.same = same
        return torch.ops.ctr_native.dot_pool_forward(keys, values, q, offsets)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        keys, values, q, offsets = ctx.saved_tensors
        gk, gv, gq = torch.ops.ctr_native.dot_pool_backward(grad.contiguous(), keys, values, q, offsets, ctx.same)
        return gk, (None if ctx.same else gv), gq, None, None


def dot_pool(
    keys: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``[B, Dv]``: for each sample b, ``Σ_n <keys_n, q_b> values_n`` over its rows ``offsets[b] .. offsets[b+1]``
    (``values`` None: the keys themselves), natively; None where the caller must run its eager form (not float32 on
    the CPU, not built, switched off, or inside `torch.compile`)."""
    vals = keys if values is None else values
    if keys.dim() != 2 or vals.dim() != 2 or q.dim() != 2 or not applies(keys, vals, q):
        return None
    same = values is None or values is keys
    keys = keys.contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    return _DotPool.apply(keys, keys if same else vals.contiguous(), q.contiguous(), offsets, same)


class _TokenAttention(torch.autograd.Function):
    """Softmax attention over a few tokens per row (`token_attention.cpp`); the probabilities are saved."""

    @staticmethod
    def forward(ctx, q, kv, heads, scale):  # type: ignore[no-untyped-def]
        out, probs = torch.ops.ctr_native.token_attention_forward(q, kv, heads, scale)
        ctx.save_for_backward(q, kv, probs)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        q, kv, probs = ctx.saved_tensors
        gq, gkv = torch.ops.ctr_native.token_attention_backward(grad.contiguous(), q, kv, probs, ctx.heads, ctx.scale)
        return gq, gkv, None, None


def token_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, scale: float) -> torch.Tensor | None:
    """``[N, Cq, D]``: per row and head, ``softmax(scale · q kᵀ) v`` over the row's C tokens, with ``q [N, Cq, D]``
    and ``kv [N, C, 2D]`` (the keys' D columns, then the values'; heads of ``D / heads`` columns each), natively;
    None where the caller must run its eager form (not float32 on the CPU, not built, switched off, inside
    `torch.compile`)."""
    if q.dim() != 3 or kv.dim() != 3 or kv.shape[-1] != 2 * q.shape[-1] or q.shape[-1] % heads:
        return None
    if not applies(q, kv):
        return None
    return _TokenAttention.apply(q.contiguous(), kv.contiguous(), heads, float(scale))


class _TargetAttention(torch.autograd.Function):
    """Masked softmax attention of H queries over a sample's K slots (`target_attention.cpp`); the probabilities
    are saved; ``same``: keys are values."""

    @staticmethod
    def forward(ctx, q, keys, values, mask, bias, same):  # type: ignore[no-untyped-def]
        out, probs = torch.ops.ctr_native.target_attention_forward(q, keys, values, mask, bias)
        ctx.save_for_backward(q, keys, values, mask, probs)
        ctx.same, ctx.with_bias = same, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        q, keys, values, mask, probs = ctx.saved_tensors
        gq, gk, gv, gb = torch.ops.ctr_native.target_attention_backward(
            grad.contiguous(), q, keys, values, mask, probs, ctx.same, ctx.with_bias
        )
        return gq, gk, (None if ctx.same else gv), None, (gb if ctx.with_bias else None), None


def target_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``[B, H, Dv]``: for sample b and head h, ``Σ_j p_hj values[b, j]`` with ``p_h = softmax_j(<q[b, h], keys[b,
    j]> + bias[b, j, h])`` over the slots where ``mask [B, K]`` is true (zeros for a sample without any), ``q [B, H,
    Dk]`` already scaled, ``keys [B, K, Dk]``, ``values [B, K, Dv]`` (None: the keys), ``bias [B, K, H]`` or None,
    natively; None where the caller must run its eager form (not float32 on the CPU, not built, switched off, inside
    `torch.compile`)."""
    vals = keys if values is None else values
    if q.dim() != 3 or keys.dim() != 3 or vals.dim() != 3 or mask.dim() != 2:
        return None
    if not applies(q, keys, vals, *(() if bias is None else (bias,))):
        return None
    same = vals is keys
    keys = keys.contiguous()
    mask = mask.to(torch.bool).contiguous()
    bias = None if bias is None else bias.contiguous()
    return _TargetAttention.apply(q.contiguous(), keys, keys if same else vals.contiguous(), mask, bias, same)


def jagged_topk(scores: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each sample's top ``k`` of jagged ``scores [total_L]`` (or ``[total_L, H]``, H columns ranked apart) by score
    descending, the later position first among equal scores, -inf and NaN never selected: ``(positions, scores)``
    ``[B, K]`` (``[B, H, K]``), -1 and 0 in empty slots; None where the caller must run its PyTorch form (not float32
    on the CPU, not built, switched off, inside `torch.compile`). `kernels.gsu_topk`'s ``cpu_select``."""
    if scores.dim() not in (1, 2) or offsets.device.type != "cpu" or not applies(scores):
        return None
    columns = scores if scores.dim() == 2 else scores.unsqueeze(1)
    pos, val = torch.ops.ctr_native.jagged_topk(columns.contiguous(), offsets.to(torch.int64).contiguous(), int(k))
    return (pos, val) if scores.dim() == 2 else (pos[:, 0], val[:, 0])


def gather_dot(
    vectors: torch.Tensor, ids: torch.Tensor | None, query: torch.Tensor, offsets: torch.Tensor, with_norms: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For behavior i of sample b (``offsets [B + 1]``), ``<v_i, query[b]>`` and, ``with_norms``, ``|v_i|²``, where
    ``v_i`` is row ``ids[i]`` of ``vectors [N, D]`` (or row i, ``ids`` None): `kernels.gsu_topk`'s ``cpu_dot``. None
    where the caller must run its PyTorch form (not float32 on the CPU, not built, switched off)."""
    if not applies(vectors, query) or offsets.device.type != "cpu":
        return None
    return torch.ops.ctr_native.gather_dot(vectors, ids, query, offsets, bool(with_norms))


def segment_dots(parts: list[torch.Tensor], queries: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
    """``[N, Q]``: for row i of sample b (``offsets [B + 1]``) and query q, ``<row_i, queries[b, q]>`` where row i is
    the concatenation of ``parts``' rows i (``[N, D_p]`` each, read in place: no concatenated copy) and ``queries [B,
    Q, Σ D_p]``. `ctr.modules.gsu.per_sample_products` without building the rows. None where the caller must run its
    PyTorch form (not float32 on the CPU, not built, switched off)."""
    if queries.dim() != 3 or any(p.dim() != 2 for p in parts) or not applies(queries, *parts):
        return None
    if offsets.device.type != "cpu":
        return None
    # rows may lie apart (a looked-up pair's halves, `Embeddings.pairs`): each row's values must be contiguous
    blocks = [p if p.stride(1) == 1 and p.stride(0) >= p.shape[1] else p.contiguous() for p in parts]
    return torch.ops.ctr_native.segment_dots(blocks, queries.contiguous(), offsets.to(torch.int64).contiguous())


def unique_inverse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The distinct values of an int64 ``x [N]`` in order of first occurrence and each position's place among them
    (``x == unique[inverse]``), through a hash table (`index_add.cpp`: no sort); None where the caller must run
    ``torch.unique`` (not an int64 CPU vector, not built, switched off). For the sparse update, whose per-row sums do
    not depend on the rows' order."""
    if x.dim() != 1 or x.device.type != "cpu" or x.dtype != torch.int64:
        return None
    if not _use or torch.compiler.is_compiling() or not available():
        return None
    unique, inverse = torch.ops.ctr_native.unique_inverse(x.contiguous())
    return unique, inverse


def kmeans_tree(x: np.ndarray, max_size: int, seed: int, iters: int, branching: int) -> np.ndarray | None:
    """Labels ``[n]`` of TWIN-V2's hierarchical k-means of the rows of ``x [n, D]`` (`pipelines.cluster`'s
    ``cluster_history``, its reference); None where the reference must run (not built or switched off)."""
    if not (_use and available()):
        return None
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    return torch.ops.ctr_native.kmeans_tree(rows, int(max_size), int(seed), int(iters), int(branching)).numpy()


from .activation_unit import din_unit as din_unit  # noqa: E402  (these use `applies` above)
from .activation_unit import simhash_pool as simhash_pool  # noqa: E402
from .activation_unit import weighted_pool as weighted_pool  # noqa: E402
from .attention_rows import attention_rows as attention_rows  # noqa: E402
from .rows import _GatherRows as _GatherRows  # noqa: E402
from .rows import gather_rows as gather_rows  # noqa: E402
from .rows import index_add_rows as index_add_rows  # noqa: E402
from .rows import next_dots as next_dots  # noqa: E402
from .rows import sum_rows as sum_rows  # noqa: E402
