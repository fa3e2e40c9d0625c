"""Functional token-mixing ops: pure jnp, differentiable, [batch, time, heads, dim] layout.

Every linear-state op returns ``(o, final_state)``; ``impl`` picks the form ("chunked", "recurrent", "parallel"),
all built by ``seqlab.core.recurrence`` from one ``chunk_terms`` function per family, or "pallas" (the kernels of
``pallas_kernels``, for the ops that declare one, and softmax_attn); the default "auto" is "pallas" on a GPU or TPU
where the op has a kernel and "chunked" otherwise. Ops that combine a local softmax or block window with a linear
state (``lolcats_attn``) or prefix sums (``flow_attn``) run their linear part through those ops;
``block_local_attn`` is dense within blocks.

Every module of this package is imported here and its public functions exported (its ``__all__`` if it has one,
else the functions it defines whose names do not start with "_"), so an op file needs no import line here.
``linear_ops()`` lists the linear-state ops declared with ``_common.linear_op``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import Any, Callable

from seqlab.ops._common import linear_ops


def _public_functions(module: ModuleType) -> dict[str, Callable[..., Any]]:
    """The names ``module`` exports: its ``__all__``, else the public functions it defines itself."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return {name: getattr(module, name) for name in names}
    return {
        name: obj for name, obj in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module.__name__
    }


def _export_op_modules() -> list[str]:
    """Import every public module of this package and bind its exports here; returns the exported names.

    All modules are imported before anything is bound: importing a submodule binds the module object to its name
    on the package (``seqlab.ops.gla``), which the op of that name (``seqlab.ops.gla.gla``) must then replace."""
    modules = [importlib.import_module(f"{__name__}.{info.name}")
               for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    exported: dict[str, Callable[..., Any]] = {}
    for module in modules:
        for name, fn in _public_functions(module).items():
            if exported.get(name, fn) is not fn:
                raise ImportError(f"seqlab.ops: {name!r} is exported by two modules ({exported[name].__module__}, {module.__name__})")
            exported[name] = fn
    globals().update(exported)
    return sorted(exported)


__all__ = [*_export_op_modules(), "linear_ops"]
