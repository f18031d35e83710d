"""The FBGEMM peer of target_attention: SLL's ``jagged_dense_flash_attention`` (fbgemm_gpu/sll/triton), a
pure-Triton kernel, loaded behind a guard, staged for machines without fbgemm_gpu, and mapped onto our op.

Loading (`load_peer`), first that works:

1. ``import fbgemm_gpu.sll.triton.triton_jagged_dense_flash_attention`` (an installed fbgemm_gpu; its wheel must
   match the machine's torch, else the import fails and the error is recorded);
2. the two source files (``triton_jagged_dense_flash_attention.py`` and the ``common.py`` it imports relatively)
   from a directory (``--fbgemm-sll-dir``, default ``benchmarks/.peers/fbgemm_sll``, git-ignored), loaded as a
   package by file path. `stage` fills that directory from the locally installed fbgemm_gpu (``python
   benchmarks/kernels.py --stage-fbgemm``) and writes the distribution's name and version to ``VERSION``, so that
   the folder can be carried to a GPU machine that has torch and Triton but no fbgemm_gpu.

Neither found: the peer is absent, with the reasons; no figure is ever written for it.

Semantics (fbgemm_gpu 1.8.0). With FBGEMM's names, for sample b over its jagged rows j (at most ``max_seq_len``)::

    out[b, t] = sum_j softmax_j(<Q[j], K[b, :, t]> + attn_bias[b, j, t]) * V[j]

``Q`` jagged ``[N, D]``, ``K`` dense ``[B, D, T]``, ``V`` jagged ``[N, D]``, ``attn_bias`` dense ``[B, max_len, T]``,
output ``[B, T, D]``; D a power of two; fp32 accumulation, the probabilities cast to V's dtype before ``p @ V``.
No scale, no temperature, one head. Ours, ``softmax_i((scale * <q_t, k_i> + bias_i) / tau_b)``, maps onto it as:

- FBGEMM's jagged ``Q`` and ``V`` = our keys and values (the same tensors); its dense ``K`` = our Q target queries,
  pre-scaled: ``bf16(query[b] * scale / tau_b)`` transposed to ``[B, D, Q]`` (a view);
- its ``attn_bias`` = our per-behavior bias divided by tau_b, padded to ``[B, L]`` (float32) and broadcast over the
  T queries with a zero stride (``expand``): every target reads the same bias, as ours does;
- called through ``JaggedDenseFlashAttention.apply`` (exported by ``fbgemm_gpu.sll.triton``), the autograd function
  behind ``jagged_dense_flash_attention``, which only adds ``.contiguous()`` on every input: that would turn the
  broadcast bias into a ``[B, L, T]`` copy inside the timed call.

The pre-scaled query and the padded bias are made once, before timing (their cost is not counted), and the
pre-scaling rounds ``scale / tau_b * q`` to bf16, so its parity with the reference is slightly looser than ours.
Forward + backward: the gradients are those FBGEMM computes (keys, values, the pre-scaled query, the padded bias);
no temperature gradient (the temperature was folded into the inputs), and its ``dBias`` is a dense ``[B, L, T]``
float32 buffer summed over T by autograd. FBGEMM 1.8.0's backward does not compile for bf16 inputs (it multiplies
the float32 probabilities with the bf16 ``dO`` in one ``tl.dot``, which Triton refuses: "Both operands must be same
dtype"), so the forward + backward rows record that error; in float32 the mapping matches the reference (tested on
the CPU in Triton's interpreter, whose 16-bit dots are wrong, so bf16 cannot be checked there).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import shutil
import sys
import types
from pathlib import Path
from typing import Any

MODULE = "fbgemm_gpu.sll.triton.triton_jagged_dense_flash_attention"
FILES = ("triton_jagged_dense_flash_attention.py", "common.py")
STAGED_PACKAGE = "_fbgemm_sll_peer"  # the name the staged copy is imported under
VERSION_FILE = "VERSION"


@dataclasses.dataclass
class Peer:
    """The loaded peer module (``None`` when absent) and where it came from, for the results file."""

    module: types.ModuleType | None
    source: str | None = None
    version: str | None = None
    error: str | None = None  # why it is absent
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. why the installed package did not import

    def record(self) -> dict[str, Any]:
        """What the results file says about the peer."""
        return {
            "kernel": "fbgemm_gpu.sll jagged_dense_flash_attention (JaggedDenseFlashAttention.apply)",
            "present": self.module is not None,
            "source": self.source,
            "version": self.version,
            "error": self.error,
            "notes": self.notes,
        }


def _error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def installed_version() -> str | None:
    """``<distribution> <version>`` of the installed package providing ``fbgemm_gpu`` (fbgemm-gpu, fbgemm-gpu-cpu,
    a nightly, ...), without importing it; None when there is none."""
    for dist in importlib.metadata.packages_distributions().get("fbgemm_gpu", []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _forget_staged() -> None:
    for name in [m for m in sys.modules if m == STAGED_PACKAGE or m.startswith(STAGED_PACKAGE + ".")]:
        del sys.modules[name]


def _load_staged(directory: Path) -> types.ModuleType:
    """The staged files imported as the package ``STAGED_PACKAGE`` (so that ``from .common import`` resolves);
    a copy from another directory, or a failed import, is forgotten first."""
    main = f"{STAGED_PACKAGE}.{Path(FILES[0]).stem}"
    package = sys.modules.get(STAGED_PACKAGE)
    if package is not None and list(package.__path__) == [str(directory)] and main in sys.modules:
        return sys.modules[main]
    _forget_staged()
    spec = importlib.machinery.ModuleSpec(STAGED_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(directory)]
    sys.modules[STAGED_PACKAGE] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(main)
    except BaseException:
        _forget_staged()
        raise


def load_peer(staged_dir: Path, try_installed: bool = True) -> Peer:
    """The peer from the installed fbgemm_gpu, else from ``staged_dir``; never raises (the reasons are kept)."""
    notes = []
    if try_installed:
        try:
            module = importlib.import_module(MODULE)
            return Peer(module, source=f"installed: {module.__file__}", version=installed_version())
        except Exception as exc:  # ImportError, or a wheel built for another torch failing to load its libraries
            notes.append(f"import {MODULE}: {_error(exc)}")
    missing = [name for name in FILES if not (staged_dir / name).is_file()]
    if missing:
        error = (
            f"no staged copy in {staged_dir} (missing {', '.join(missing)}; stage one with `python "
            "benchmarks/kernels.py --stage-fbgemm` where fbgemm_gpu is installed)"
        )
        return Peer(None, error="; ".join([*notes, error]), notes=notes)
    version_path = staged_dir / VERSION_FILE
    version = version_path.read_text().strip() if version_path.is_file() else None
    try:
        module = _load_staged(staged_dir)
    except Exception as exc:
        return Peer(None, version=version, error="; ".join([*notes, f"staged copy: {_error(exc)}"]), notes=notes)
    if try_installed:
        notes.append("no fbgemm_gpu wheel matching this machine's torch imports: the staged source files are used")
    return Peer(module, source=f"staged copy: {staged_dir}", version=version, notes=notes)


def stage(dest: Path) -> str:
    """Copy the peer's source files from the installed fbgemm_gpu into ``dest`` with a ``VERSION`` file; returns
    the version. Finds the package without importing it (its native libraries need not load here)."""
    spec = importlib.util.find_spec("fbgemm_gpu")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fbgemm_gpu is not installed here (pip install fbgemm-gpu-cpu==1.8.0)")
    source = Path(next(iter(spec.submodule_search_locations))) / "sll" / "triton"
    version = installed_version() or "fbgemm_gpu (version unknown)"
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(source / name, dest / name)
    (dest / VERSION_FILE).write_text(f"{version}\n")
    return version
