"""Raw ctypes declarations of the libdynmoe C API (``include/dynmoe.h``).

This module mirrors the header one to one: every constant, every struct (same field order and
types) and every function (``argtypes``/``restype``). It does no argument checking and raises no
Python exceptions of its own; the Pythonic layer in :mod:`dynmoe._model` is built on top of it.

The shared library is loaded lazily by :func:`lib` so that ``import dynmoe`` works (and the
policy classes can be used) even before the library has been built. The lookup order is:

1. the path in the environment variable ``DYNMOE_LIBRARY``;
2. ``libdynmoe.so`` next to this file (a copy shipped inside an installed package);
3. ``build/lib/libdynmoe.so`` of the source tree, found by walking up from this file to the
   directory that holds ``include/dynmoe.h`` (the output of ``make lib``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint64,
    c_void_p,
)
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

DYNMOE_VERSION_MAJOR = 0
DYNMOE_VERSION_MINOR = 5
DYNMOE_VERSION_PATCH = 0

dynmoe_status = c_int32

DYNMOE_OK = 0
DYNMOE_ERR_INVALID_ARGUMENT = 1
DYNMOE_ERR_IO = 2
DYNMOE_ERR_FORMAT = 3
DYNMOE_ERR_UNSUPPORTED = 4
DYNMOE_ERR_BUFFER_TOO_SMALL = 5
DYNMOE_ERR_OUT_OF_MEMORY = 6
DYNMOE_ERR_CONTEXT_FULL = 7
DYNMOE_ERR_BUSY = 8
DYNMOE_ERR_NOT_AVAILABLE = 9
DYNMOE_ERR_INTERNAL = 10

#: Status code -> name, as returned by ``dynmoe_status_name``.
STATUS_NAMES = {
    DYNMOE_OK: "DYNMOE_OK",
    DYNMOE_ERR_INVALID_ARGUMENT: "DYNMOE_ERR_INVALID_ARGUMENT",
    DYNMOE_ERR_IO: "DYNMOE_ERR_IO",
    DYNMOE_ERR_FORMAT: "DYNMOE_ERR_FORMAT",
    DYNMOE_ERR_UNSUPPORTED: "DYNMOE_ERR_UNSUPPORTED",
    DYNMOE_ERR_BUFFER_TOO_SMALL: "DYNMOE_ERR_BUFFER_TOO_SMALL",
    DYNMOE_ERR_OUT_OF_MEMORY: "DYNMOE_ERR_OUT_OF_MEMORY",
    DYNMOE_ERR_CONTEXT_FULL: "DYNMOE_ERR_CONTEXT_FULL",
    DYNMOE_ERR_BUSY: "DYNMOE_ERR_BUSY",
    DYNMOE_ERR_NOT_AVAILABLE: "DYNMOE_ERR_NOT_AVAILABLE",
    DYNMOE_ERR_INTERNAL: "DYNMOE_ERR_INTERNAL",
}

DYNMOE_DTYPE_F32 = 0
DYNMOE_DTYPE_F16 = 1
DYNMOE_DTYPE_BF16 = 2

DYNMOE_ROUTING_NATIVE = 0
DYNMOE_ROUTING_TOP_K = 1
DYNMOE_ROUTING_TOP_P = 2

DYNMOE_RENORMALIZE_NATIVE = -1

DYNMOE_LOGITS_DEFAULT = 0
DYNMOE_LOGITS_ALL = 1
DYNMOE_LOGITS_LAST = 2

# --------------------------------------------------------------------------------------------
# Opaque handles
# --------------------------------------------------------------------------------------------


class dynmoe_model(Structure):
    """Opaque ``dynmoe_model``; only used through pointers."""


class dynmoe_routing(Structure):
    """Opaque ``dynmoe_routing``."""


class dynmoe_trace(Structure):
    """Opaque ``dynmoe_trace``."""


class dynmoe_stats(Structure):
    """Opaque ``dynmoe_stats``."""


class dynmoe_session(Structure):
    """Opaque ``dynmoe_session``."""


dynmoe_model_p = POINTER(dynmoe_model)
dynmoe_routing_p = POINTER(dynmoe_routing)
dynmoe_trace_p = POINTER(dynmoe_trace)
dynmoe_stats_p = POINTER(dynmoe_stats)
dynmoe_session_p = POINTER(dynmoe_session)

# --------------------------------------------------------------------------------------------
# Callbacks and structs
# --------------------------------------------------------------------------------------------

#: ``void (*)(float progress, void *user_data)``
dynmoe_progress_callback = CFUNCTYPE(None, c_float, c_void_p)


class dynmoe_load_params(Structure):
    _fields_ = [
        ("n_threads", c_int32),
        ("prefetch", c_int32),
        ("progress_callback", dynmoe_progress_callback),
        ("progress_user_data", c_void_p),
        ("lock_memory", c_int32),
    ]


class dynmoe_model_info(Structure):
    _fields_ = [
        ("family", c_char * 32),
        ("architecture", c_char * 64),
        ("num_layers", c_int32),
        ("num_moe_layers", c_int32),
        ("num_experts", c_int32),
        ("hidden_size", c_int32),
        ("vocab_size", c_int32),
        ("num_attention_heads", c_int32),
        ("num_key_value_heads", c_int32),
        ("head_dim", c_int32),
        ("max_position_embeddings", c_int32),
        ("dtype", c_int32),
        ("native_mode", c_int32),
        ("native_top_k", c_int32),
        ("native_top_p", c_float),
        ("native_renormalize", c_int32),
        ("has_shared_expert", c_int32),
        ("bos_token_id", c_int32),
        ("eos_token_id", c_int32),
        ("total_parameters", c_int64),
        ("parameters_per_expert", c_int64),
        ("always_active_parameters", c_int64),
    ]


class dynmoe_policy(Structure):
    _fields_ = [
        ("mode", c_int32),
        ("k", c_int32),
        ("threshold", c_float),
        ("min_experts", c_int32),
        ("max_experts", c_int32),
        ("renormalize", c_int32),
    ]


class dynmoe_routing_event(Structure):
    _fields_ = [
        ("layer", c_int32),
        ("num_tokens", c_int32),
        ("num_experts", c_int32),
        ("stride", c_int32),
        ("experts", POINTER(c_int32)),
        ("weights", POINTER(c_float)),
        ("counts", POINTER(c_int32)),
        ("probabilities", POINTER(c_float)),
    ]


#: ``void (*)(const dynmoe_routing_event *event, void *user_data)``
dynmoe_routing_observer = CFUNCTYPE(None, POINTER(dynmoe_routing_event), c_void_p)


class dynmoe_forward_params(Structure):
    _fields_ = [
        ("routing", dynmoe_routing_p),
        ("record_trace", c_int32),
        ("logits_mode", c_int32),
        ("observer", dynmoe_routing_observer),
        ("observer_user_data", c_void_p),
    ]


class dynmoe_stats_summary(Structure):
    _fields_ = [
        ("tokens", c_int64),
        ("mean_experts_per_token", c_double),
        ("activated_parameters_per_token", c_double),
        ("activated_parameter_fraction", c_double),
        ("total_parameters", c_int64),
        ("num_layers", c_int32),
        ("num_moe_layers", c_int32),
    ]


class dynmoe_timing(Structure):
    _fields_ = [
        ("passes", c_int64),
        ("tokens", c_int64),
        ("total_seconds", c_double),
        ("attention_seconds", c_double),
        ("moe_seconds", c_double),
        ("dense_seconds", c_double),
        ("head_seconds", c_double),
        ("other_seconds", c_double),
    ]


class dynmoe_layer_stats(Structure):
    _fields_ = [
        ("layer", c_int32),
        ("is_moe", c_int32),
        ("num_experts", c_int32),
        ("tokens", c_int64),
        ("mean_experts_per_token", c_double),
        ("mean_router_entropy", c_double),
        ("mean_kept_mass", c_double),
        ("load_max_over_mean", c_double),
        ("load_coefficient_of_variation", c_double),
        ("busiest_expert", c_int32),
        ("idlest_expert", c_int32),
        ("activated_parameters_per_token", c_double),
    ]


class dynmoe_session_params(Structure):
    _fields_ = [
        ("n_sequences", c_int32),
        ("capacity", c_int32),
        ("memory_budget_bytes", c_int64),
        ("routing", dynmoe_routing_p),
        ("kv_dtype", c_int32),
    ]


class dynmoe_sampling_params(Structure):
    _fields_ = [
        ("temperature", c_float),
        ("top_k", c_int32),
        ("top_p", c_float),
        ("seed", c_uint64),
    ]


#: ``int32_t (*)(const int32_t *tokens, int32_t n_sequences, int32_t step, void *user_data)``
dynmoe_token_callback = CFUNCTYPE(c_int32, POINTER(c_int32), c_int32, c_int32, c_void_p)

# --------------------------------------------------------------------------------------------
# Function prototypes: name -> (restype, argtypes)
# --------------------------------------------------------------------------------------------

_P = POINTER

PROTOTYPES = {
    # Version and errors
    "dynmoe_version": (c_char_p, []),
    "dynmoe_system_info": (c_char_p, []),
    "dynmoe_status_name": (c_char_p, [dynmoe_status]),
    "dynmoe_last_error": (c_char_p, []),
    "dynmoe_clear_error": (None, []),
    # Models
    "dynmoe_load_params_default": (dynmoe_load_params, []),
    "dynmoe_model_load": (dynmoe_status, [c_char_p, _P(dynmoe_load_params), _P(dynmoe_model_p)]),
    "dynmoe_model_free": (None, [dynmoe_model_p]),
    "dynmoe_model_get_info": (dynmoe_status, [dynmoe_model_p, _P(dynmoe_model_info)]),
    "dynmoe_model_get_moe_layers": (dynmoe_status, [dynmoe_model_p, _P(c_int32), c_size_t, _P(c_size_t)]),
    # Routing
    "dynmoe_policy_native": (dynmoe_policy, []),
    "dynmoe_policy_top_k": (dynmoe_policy, [c_int32]),
    "dynmoe_policy_top_p": (dynmoe_policy, [c_float]),
    "dynmoe_routing_create": (dynmoe_status, [dynmoe_model_p, _P(dynmoe_policy), _P(dynmoe_routing_p)]),
    "dynmoe_routing_set_layer": (dynmoe_status, [dynmoe_routing_p, c_int32, _P(dynmoe_policy)]),
    "dynmoe_routing_free": (None, [dynmoe_routing_p]),
    # Forward
    "dynmoe_forward_params_default": (dynmoe_forward_params, []),
    "dynmoe_forward": (
        dynmoe_status,
        [dynmoe_model_p, _P(c_int32), c_int32, c_int32, _P(dynmoe_forward_params), _P(c_float), c_size_t,
         _P(dynmoe_trace_p)],
    ),
    "dynmoe_trace_get_shape": (
        dynmoe_status, [dynmoe_trace_p, _P(c_int32), _P(c_int32), _P(c_int32), _P(c_int32)]),
    "dynmoe_trace_get_hidden": (dynmoe_status, [dynmoe_trace_p, c_int32, _P(c_float), c_size_t]),
    "dynmoe_trace_get_router_probs": (dynmoe_status, [dynmoe_trace_p, c_int32, _P(c_float), c_size_t]),
    "dynmoe_trace_get_selected": (dynmoe_status, [dynmoe_trace_p, c_int32, _P(c_uint8), c_size_t]),
    "dynmoe_trace_get_weights": (dynmoe_status, [dynmoe_trace_p, c_int32, _P(c_float), c_size_t]),
    "dynmoe_trace_get_token_experts": (
        dynmoe_status,
        [dynmoe_trace_p, c_int32, c_int32, c_int32, _P(c_int32), _P(c_float), c_size_t, _P(c_size_t)],
    ),
    "dynmoe_trace_free": (None, [dynmoe_trace_p]),
    # Statistics
    "dynmoe_model_get_stats": (dynmoe_status, [dynmoe_model_p, _P(dynmoe_stats_p)]),
    "dynmoe_model_reset_stats": (dynmoe_status, [dynmoe_model_p]),
    "dynmoe_trace_get_stats": (dynmoe_status, [dynmoe_trace_p, _P(dynmoe_stats_p)]),
    "dynmoe_stats_get_summary": (dynmoe_status, [dynmoe_stats_p, _P(dynmoe_stats_summary)]),
    "dynmoe_stats_get_layer": (dynmoe_status, [dynmoe_stats_p, c_int32, _P(dynmoe_layer_stats)]),
    "dynmoe_stats_get_expert_counts": (dynmoe_status, [dynmoe_stats_p, c_int32, _P(c_int64), c_size_t]),
    "dynmoe_stats_get_expert_weight_sums": (dynmoe_status, [dynmoe_stats_p, c_int32, _P(c_double), c_size_t]),
    "dynmoe_stats_get_histogram": (dynmoe_status, [dynmoe_stats_p, c_int32, _P(c_int64), c_size_t]),
    # char *buffer is declared as c_void_p so that a ctypes string buffer (or None) can be passed.
    "dynmoe_stats_to_json": (dynmoe_status, [dynmoe_stats_p, c_void_p, c_size_t, _P(c_size_t)]),
    "dynmoe_stats_free": (None, [dynmoe_stats_p]),
    # Sessions
    "dynmoe_session_params_default": (dynmoe_session_params, []),
    "dynmoe_session_create": (dynmoe_status, [dynmoe_model_p, _P(dynmoe_session_params), _P(dynmoe_session_p)]),
    "dynmoe_session_free": (None, [dynmoe_session_p]),
    "dynmoe_session_eval": (
        dynmoe_status,
        [dynmoe_session_p, _P(c_int32), c_int32, _P(dynmoe_forward_params), _P(c_float), c_size_t,
         _P(dynmoe_trace_p)],
    ),
    "dynmoe_session_get_position": (dynmoe_status, [dynmoe_session_p, _P(c_int32)]),
    "dynmoe_session_get_capacity": (dynmoe_status, [dynmoe_session_p, _P(c_int32)]),
    "dynmoe_session_rewind": (dynmoe_status, [dynmoe_session_p, c_int32]),
    "dynmoe_session_set_routing": (dynmoe_status, [dynmoe_session_p, dynmoe_routing_p]),
    "dynmoe_session_get_stats": (dynmoe_status, [dynmoe_session_p, _P(dynmoe_stats_p)]),
    "dynmoe_session_reset_stats": (dynmoe_status, [dynmoe_session_p]),
    "dynmoe_session_get_timing": (dynmoe_status, [dynmoe_session_p, _P(dynmoe_timing)]),
    "dynmoe_sampling_params_default": (dynmoe_sampling_params, []),
    "dynmoe_session_generate": (
        dynmoe_status,
        [dynmoe_session_p, _P(c_int32), c_int32, c_int32, _P(dynmoe_sampling_params), _P(c_int32), c_size_t,
         _P(dynmoe_forward_params), dynmoe_token_callback, c_void_p, _P(c_int32), c_size_t, _P(c_int32)],
    ),
}

# --------------------------------------------------------------------------------------------
# Library loading
# --------------------------------------------------------------------------------------------

LIBRARY_ENV = "DYNMOE_LIBRARY"
LIBRARY_NAME = "libdynmoe.so"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _repo_root(start: Path) -> Path | None:
    """The nearest ancestor of `start` holding ``include/dynmoe.h`` (the source tree), if any."""
    for parent in start.resolve().parents:
        if (parent / "include" / "dynmoe.h").is_file():
            return parent
    return None


def find_library() -> Path:
    """Returns the path of the libdynmoe shared library to load (see the module docstring).

    Raises:
        OSError: no library was found; the message says how to build or point to one.
    """
    env = os.environ.get(LIBRARY_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise OSError(f"{LIBRARY_ENV} is set to {env!r}, which is not a file")
        return path
    here = Path(__file__).resolve().parent
    bundled = here / LIBRARY_NAME
    if bundled.is_file():
        return bundled
    repo = _repo_root(here)
    if repo is not None:
        built = repo / "build" / "lib" / LIBRARY_NAME
        if built.is_file():
            return built
        raise OSError(
            f"{LIBRARY_NAME} not found: it is not built yet at {built}. Run `make lib` in {repo}, "
            f"or set {LIBRARY_ENV} to the library's path."
        )
    raise OSError(
        f"{LIBRARY_NAME} not found: set {LIBRARY_ENV} to its path, copy it next to {here / '__init__.py'}, "
        f"or run `make lib` in the dynmoe source tree."
    )


def _declare(cdll: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(cdll, name)
        fn.restype = restype
        fn.argtypes = argtypes


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Loads libdynmoe from `path` (or :func:`find_library`) and declares every function.

    Unlike :func:`lib` this does not cache the result.
    """
    resolved = Path(path) if path is not None else find_library()
    mode = ctypes.RTLD_LOCAL if sys.platform != "win32" else 0
    cdll = ctypes.CDLL(str(resolved), mode=mode)
    try:
        _declare(cdll)
    except AttributeError as exc:  # a function of the header missing from the library
        raise OSError(f"{resolved} does not match dynmoe.h: {exc}") from exc
    version = cdll.dynmoe_version().decode()
    if not compatible_version(version):
        wanted = f"{DYNMOE_VERSION_MAJOR}.{DYNMOE_VERSION_MINOR}.x" if DYNMOE_VERSION_MAJOR == 0 else f"{DYNMOE_VERSION_MAJOR}.x"
        raise OSError(f"{resolved} is libdynmoe {version}, these bindings need {wanted}")
    return cdll


def compatible_version(version: str) -> bool:
    """Whether a library of `version` has the structs declared here: the same major version, and
    before 1.0 the same minor version too (0.x minor releases may change struct layouts, as 0.2
    did by adding dynmoe_session_params.kv_dtype)."""
    parts = version.split(".")
    if len(parts) < 2 or parts[0] != str(DYNMOE_VERSION_MAJOR):
        return False
    return DYNMOE_VERSION_MAJOR != 0 or parts[1] == str(DYNMOE_VERSION_MINOR)


def lib() -> ctypes.CDLL:
    """The process-wide libdynmoe handle, loaded on first use."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = load_library()
    return _lib
