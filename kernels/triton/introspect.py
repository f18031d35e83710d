"""What Triton compiled: for every specialization of a kernel, its registers, spills, shared memory, warps and
stages (the kernel benchmark records them after each case).

A ``@triton.jit`` function (`triton.runtime.jit.JITFunction`) keeps, per device, a cache of the `CompiledKernel` of
every specialization it was launched with (``device_caches[device][0]``: cache key -> kernel). Decorators over it
(``triton.autotune``'s `Autotuner`, ``triton.heuristics``) hold it in ``.fn``, possibly several deep. A compiled
kernel's ``metadata`` (shared memory, warps, stages) is known once compiled; its ``n_regs`` and ``n_spills`` are set
when its binary is loaded (`CompiledKernel._init_handles`, on the first launch), so a kernel compiled but never
launched reports them as None. An interpreted kernel (``TRITON_INTERPRET=1``: an `InterpretedFunction`) compiles
nothing and reports no specialization.

Read against Triton 3.6 (runtime/jit.py, compiler/compiler.py); torch and Triton only.
"""

from __future__ import annotations

import hashlib
import types
from typing import Any

from triton.runtime.jit import JITFunction

_MAX_DEPTH = 16  # decorators nest a few deep; a cycle of .fn must not loop forever


def jit_function(kernel: object) -> JITFunction | None:
    """The `JITFunction` under ``kernel`` (itself, or found by following ``.fn``), or None (an interpreted
    function, a plain Python function, anything else)."""
    obj = kernel
    for _ in range(_MAX_DEPTH):
        if isinstance(obj, JITFunction):
            return obj
        if isinstance(obj, types.FunctionType) or not hasattr(obj, "fn"):
            return None
        obj = obj.fn
    return None


def _str(value: Any) -> str:
    return value.cache_key if isinstance(value, JITFunction) else str(value)


def _specialization(compiled: Any, jit: JITFunction) -> tuple[dict[str, str], dict[str, str]]:
    """(constexpr name -> value, argument name -> type of the other arguments) of a compiled kernel."""
    src = getattr(compiled, "src", None)
    constants = getattr(src, "constants", None) or {}
    names = list(getattr(jit, "arg_names", []))
    constexprs = {}
    for path, value in constants.items():
        index = path[0] if isinstance(path, tuple) and path else path
        name = names[index] if isinstance(index, int) and index < len(names) else str(path)
        if isinstance(path, tuple) and len(path) > 1:
            name += "".join(f"[{i}]" for i in path[1:])
        constexprs[name] = _str(value)
    signature = getattr(src, "signature", None) or {}
    types_ = {name: str(ty) for name, ty in signature.items() if str(ty) != "constexpr"}
    return constexprs, types_


def compiled_stats(kernel: object) -> list[dict[str, Any]]:
    """One dict per compiled specialization of ``kernel`` (a `JITFunction`, or a decorator holding one in
    ``.fn``), on every device: ``name``, ``function`` (module:qualname), ``device``, ``constexprs`` and
    ``signature`` (stringified), ``key`` (a digest of Triton's cache key, telling specializations apart),
    ``n_regs``, ``n_spills`` (None until the kernel was launched), ``shared`` (bytes), ``num_warps``,
    ``num_stages``, ``num_ctas``. [] for an interpreted or never-compiled kernel."""
    jit = jit_function(kernel)
    if jit is None:
        return []
    function = f"{getattr(jit, 'module', '?')}:{getattr(jit.fn, '__qualname__', jit.fn.__name__)}"
    stats = []
    # items() only: indexing the defaultdict would create a cache (and query the driver) for a new device.
    for device, caches in list(jit.device_caches.items()):
        for key, compiled in list(caches[0].items()):
            if hasattr(compiled, "result") and not hasattr(compiled, "metadata"):  # an async compile
                if not compiled.done():
                    continue
                compiled = compiled.result()
            metadata = getattr(compiled, "metadata", None)
            constexprs, signature = _specialization(compiled, jit)
            stats.append(
                {
                    "name": getattr(compiled, "name", jit.fn.__name__),
                    "function": function,
                    "device": str(device),
                    "constexprs": constexprs,
                    "signature": signature,
                    "key": hashlib.sha1(str(key).encode()).hexdigest()[:12],
                    "n_regs": getattr(compiled, "n_regs", None),
                    "n_spills": getattr(compiled, "n_spills", None),
                    "shared": getattr(metadata, "shared", None),
                    "num_warps": getattr(metadata, "num_warps", None),
                    "num_stages": getattr(metadata, "num_stages", None),
                    "num_ctas": getattr(metadata, "num_ctas", None),
                }
            )
    return stats


def module_kernels(module: types.ModuleType) -> dict[str, object]:
    """The module's attributes that are Triton kernels (a `JITFunction`, or a decorator over one), by name;
    helpers imported from another module included (callers deduplicate)."""
    return {
        name: value
        for name, value in vars(module).items()
        if not isinstance(value, type | types.ModuleType) and jit_function(value) is not None
    }
