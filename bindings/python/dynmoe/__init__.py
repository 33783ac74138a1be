"""Python bindings for dynmoe, a Mixture-of-Experts inference engine with dynamic routing.

Quick start::

    import dynmoe

    with dynmoe.Model("path/to/checkpoint") as model:
        out = model.forward([[1, 2, 3]], routing=dynmoe.TopP(0.5), trace=True)
        out.logits                    # float32 [B, T, V]
        out.trace[layer].selected     # bool [B, T, E] for each MoE layer
        print(model.stats())          # per-layer routing statistics
        model.generate([1, 2, 3], max_new_tokens=8)

The package is a thin layer over the C library libdynmoe (see ``dynmoe._capi`` for the raw
ctypes declarations). The library is found through the ``DYNMOE_LIBRARY`` environment variable,
a ``libdynmoe.so`` next to this file, or the ``build/lib`` directory of the source tree.
"""

from ._errors import DynMoEError
from ._model import ForwardOutput, LayerTrace, Model, ModelInfo, Session, Timing
from ._routing import TopK, TopP
from ._stats import LayerStats, Stats

__version__ = "0.5.0"

__all__ = [
    "DynMoEError",
    "ForwardOutput",
    "LayerStats",
    "LayerTrace",
    "Model",
    "ModelInfo",
    "Session",
    "Stats",
    "Timing",
    "TopK",
    "TopP",
    "library_path",
    "library_version",
    "system_info",
]


def library_version() -> str:
    """The version of the loaded libdynmoe ("MAJOR.MINOR.PATCH"); loads the library if needed."""
    from . import _capi

    return _capi.lib().dynmoe_version().decode()


def system_info() -> dict[str, str]:
    """What the loaded libdynmoe runs on this machine (`dynmoe_system_info`), by key: "version",
    "build" (instruction sets compiled for, comma-separated), "prefill" ("avx512", "avx2" or
    "swift": the bf16 kernel for several tokens, chosen at run time), "decode" ("avx512", "avx2" or "simd8": the bf16 kernel for one token),
    "cpus" (online CPUs); later versions may add keys. Loads the library if needed."""
    from . import _capi

    line = _capi.lib().dynmoe_system_info().decode()
    return dict(pair.split("=", 1) for pair in line.split())


def library_path() -> str:
    """The path of the libdynmoe the bindings load (see the module docstring for the search order)."""
    from . import _capi

    return str(_capi.find_library())
