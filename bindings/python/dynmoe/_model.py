"""Models, forward passes and decoding sessions: the Pythonic layer over :mod:`dynmoe._capi`."""

from __future__ import annotations

import ctypes
import math
import numbers
import os
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from . import _capi
from ._errors import DynMoEError, check
from ._routing import Routing, TopK, TopP, parse_routing, routing_plan
from ._stats import Stats, read_stats

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

_DTYPE_NAMES = {_capi.DYNMOE_DTYPE_F32: "float32", _capi.DYNMOE_DTYPE_F16: "float16",
                _capi.DYNMOE_DTYPE_BF16: "bfloat16"}
_MODE_NAMES = {_capi.DYNMOE_ROUTING_NATIVE: "native", _capi.DYNMOE_ROUTING_TOP_K: "top_k",
               _capi.DYNMOE_ROUTING_TOP_P: "top_p"}

# --------------------------------------------------------------------------------------------
# Argument conversion
# --------------------------------------------------------------------------------------------


def _ptr(array: np.ndarray, ctype):
    return array.ctypes.data_as(ctypes.POINTER(ctype))


def _out_of_int32(name: str, value) -> ValueError:
    return ValueError(f"{name}: token id {int(value)} is outside the int32 range [{_INT32_MIN}, {_INT32_MAX}]")


def _int_objects(array: np.ndarray, name: str) -> np.ndarray:
    """An object array of token ids (e.g. Python ints too large for int64) as int64, checked one by one."""
    for value in array.flat:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            error = ValueError if isinstance(value, (numbers.Number, np.bool_)) else TypeError
            raise error(f"{name} must be integer token ids, got {type(value).__name__} {value!r}")
        if not _INT32_MIN <= value <= _INT32_MAX:
            raise _out_of_int32(name, value)
    return array.astype(np.int64)


def _as_tokens(ids, name: str = "ids", allow_empty: bool = False) -> tuple[np.ndarray, bool]:
    """Converts token ids to a contiguous int32 [B, T] array; also returns whether `ids` was 1-D.

    `ids` is a (nested) sequence of ints of any size or an integer (or object) numpy array; ids
    outside int32 raise ValueError naming the id. Iterators are refused (TypeError) rather than
    consumed.
    """
    if ids is None or isinstance(ids, (str, bytes, bytearray, dict, set, frozenset)):
        raise TypeError(f"{name} must be a sequence or numpy array of ints, got {type(ids).__name__}")
    if isinstance(ids, Iterator):
        raise TypeError(f"{name} must be a sequence or numpy array of ints, not an iterator (got "
                        f"{type(ids).__name__}): materialise it with list()")
    try:
        array = np.asarray(ids)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular [T] or [B, T] array of token ids: {exc}") from None
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must have 1 ([T]) or 2 ([B, T]) dimensions, got shape {array.shape}")
    if array.size == 0:
        if not allow_empty or (array.ndim == 2 and array.shape[0] == 0):
            raise ValueError(f"{name} is empty (shape {array.shape})")
        array = array.astype(np.int32)
    if array.dtype.kind == "f" and not isinstance(ids, np.ndarray):
        # numpy makes floats of Python ints that fit neither int64 nor uint64 together ([1, 2**63]):
        # look at the elements themselves.
        array = np.array(ids, dtype=object)
    if array.dtype.kind == "O":
        array = _int_objects(array, name)
    if array.dtype.kind not in "iu":
        if array.dtype.kind in "fcb":
            raise ValueError(f"{name} must be integer token ids, got dtype {array.dtype}")
        raise TypeError(f"{name} must be integer token ids, got dtype {array.dtype}")
    outside = (array < _INT32_MIN) | (array > _INT32_MAX)
    if outside.any():
        raise _out_of_int32(name, array[outside][0])
    one_d = array.ndim == 1
    if one_d:
        array = array[None, :]
    return np.ascontiguousarray(array, dtype=np.int32), one_d


def _check_int(name: str, value, minimum: int, maximum: int = _INT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return int(value)


def _float32(value: float) -> float:
    """`value` rounded to float32, as the library receives it (inf where it overflows)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _check_float(name: str, value, low: float, high: float, low_open: bool) -> float:
    """A finite float in [low, high] (or (low, high] with low_open), also once rounded to float32;
    high may be inf for "no bound"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)

    def ok(v: float) -> bool:
        return math.isfinite(v) and (low < v if low_open else low <= v) and v <= high

    if not ok(value) or not ok(_float32(value)):
        if math.isfinite(high):
            bounds = f"in {'(' if low_open else '['}{low}, {high}]"
        else:
            bounds = f"finite and {'>' if low_open else '>='} {low}"
        rounded = f" (float32: {_float32(value)!r})" if ok(value) else ""
        raise ValueError(f"{name} must be {bounds}, also as a float32, got {value!r}{rounded}"
                         if rounded else f"{name} must be {bounds}, got {value}")
    return value


def _check_temperature(value) -> float:
    """0 (greedy), or a temperature whose float32 reciprocal (the library's scale of the logits) is finite."""
    value = _check_float("temperature", value, 0.0, float("inf"), low_open=False)
    if value > 0:
        with np.errstate(over="ignore", divide="ignore"):
            inverse = np.float32(1) / np.float32(value)
        if not np.isfinite(inverse):
            raise ValueError(f"temperature must be 0 (greedy) or large enough that 1/temperature is finite in "
                             f"float32 (above about {1 / float(np.finfo(np.float32).max):.4g}), got {value!r} "
                             f"(float32: {_float32(value)!r})")
    return value


@dataclass(frozen=True)
class _Generation:
    """Validated arguments of a generate/stream call."""

    sampling: _capi.dynmoe_sampling_params
    stop: np.ndarray
    max_new_tokens: int


def _generation_args(max_new_tokens, temperature, top_k, top_p, seed, stop_tokens) -> _Generation:
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0)
    sampling = _capi.dynmoe_sampling_params(
        temperature=_check_temperature(temperature),
        top_k=_check_int("top_k", top_k, 0),
        top_p=_check_float("top_p", top_p, 0.0, 1.0, low_open=True),
        seed=_check_int("seed", seed, 0, 2**64 - 1))
    if stop_tokens is None:
        stop_tokens = ()
    if isinstance(stop_tokens, numbers.Integral) and not isinstance(stop_tokens, bool):
        stop_tokens = (stop_tokens,)
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Iterable):
        raise TypeError(f"stop_tokens must be an iterable of ints, got {type(stop_tokens).__name__}")
    stop = np.array([_check_int("stop token", t, _INT32_MIN) for t in stop_tokens], dtype=np.int32)
    return _Generation(sampling, stop, max_new_tokens)


def _context_full(position: int, length: int, max_new_tokens: int, capacity: int) -> None:
    """Raises the DYNMOE_ERR_CONTEXT_FULL that dynmoe_session_generate reports when the positions
    a generation needs do not fit, before a [B, max_new_tokens] output is allocated for it."""
    needed = position + length + max(0, max_new_tokens - 1)
    if needed > capacity:
        raise DynMoEError(_capi.DYNMOE_ERR_CONTEXT_FULL,
                          f"generate: {position} cached + {length} prompt + {max_new_tokens} new tokens need "
                          f"{needed} positions (the last new token is not evaluated), more than the capacity of "
                          f"{capacity}")


def _shortest_float32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 as `value` (0.4, not 0.4000000059604645)."""
    return float(str(np.float32(value)))


def _refuse_copy(self, *_args):
    raise TypeError(f"dynmoe.{type(self).__name__} cannot be copied or pickled; it owns a library handle "
                    f"({_COPY_HINTS[type(self).__name__]})")


_COPY_HINTS = {
    "Model": "share the model instead, it may be used from several threads; or load the checkpoint again "
             "with dynmoe.Model(model.path)",
    "Session": "create another with model.session(...); a session's cache cannot be duplicated",
}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a model is (``dynmoe_model_info`` plus the MoE layer indices).

    ``dtype`` is "float32", "float16" or "bfloat16"; ``native_mode`` is "top_k" or "top_p";
    ``bos_token_id``/``eos_token_id`` are None when config.json has none (or names an id outside the
    vocabulary).
    """

    family: str
    architecture: str
    num_layers: int
    num_moe_layers: int
    moe_layers: tuple
    num_experts: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: str
    native_mode: str
    native_top_k: int
    native_top_p: float
    native_renormalize: bool
    has_shared_expert: bool
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    total_parameters: int
    parameters_per_expert: int
    always_active_parameters: int

    @property
    def native_policy(self) -> Union[TopK, TopP]:
        """The checkpoint's native routing as an explicit :class:`TopK` or :class:`TopP`."""
        if self.native_mode == "top_p":
            return TopP(self.native_top_p, renormalize=self.native_renormalize)
        return TopK(self.native_top_k, renormalize=self.native_renormalize)


@dataclass(frozen=True)
class Timing:
    """Where a session's forward time went (:meth:`Session.timing`): wall-clock seconds summed
    over its forward passes, split into sub-blocks (see ``dynmoe_timing`` in dynmoe.h)."""

    passes: int
    tokens: int
    total_seconds: float
    attention_seconds: float
    #: router, selection, routing observers, chosen and shared experts, their weighted sum
    moe_seconds: float
    dense_seconds: float
    #: final norm and LM head
    head_seconds: float
    #: argument checks, embedding lookup, residual adds, trace recording
    other_seconds: float


@dataclass(frozen=True, eq=False)
class LayerTrace:
    """Routing decisions of one MoE layer in one call; arrays are [B, T, E].

    Attributes:
        router_probs: float32, softmax of the router logits.
        selected: bool, True where the expert ran for the token.
        weights: float32, the scale of each expert's output (0 where not selected).
    """

    router_probs: np.ndarray
    selected: np.ndarray
    weights: np.ndarray

    @property
    def experts_per_token(self) -> np.ndarray:
        """int64 [B, T]: experts each token used."""
        return self.selected.sum(axis=-1)


@dataclass(frozen=True, eq=False)
class ForwardOutput:
    """Result of :meth:`Model.forward` (and of :meth:`Session.eval` with ``trace=True``).

    Attributes:
        logits: float32 [B, T, V] (a 1-D input gives B = 1); [B, V] for a session's last-position eval.
        trace: ``{layer: LayerTrace}`` for every MoE layer, or None without ``trace=True``.
        hidden: output hidden state of every decoder layer (before the final norm), a list of
            float32 [B, T, H] indexed by layer, or None without ``trace=True``.
        stats: :class:`Stats` of this call alone, or None without ``trace=True``.
    """

    logits: np.ndarray
    trace: Optional[dict] = None
    hidden: Optional[list] = None
    stats: Optional[Stats] = None


def _read_trace(handle: _capi.dynmoe_trace_p, moe_layers: Iterable[int], num_experts: int):
    lib = _capi.lib()
    batch, length, layers, hidden_size = (ctypes.c_int32() for _ in range(4))
    check(lib.dynmoe_trace_get_shape(handle, batch, length, layers, hidden_size))
    b, t = batch.value, length.value
    hidden = []
    for layer in range(layers.value):
        out = np.empty((b, t, hidden_size.value), dtype=np.float32)
        check(lib.dynmoe_trace_get_hidden(handle, layer, _ptr(out, ctypes.c_float), out.size))
        hidden.append(out)
    trace = {}
    for layer in moe_layers:
        probs = np.empty((b, t, num_experts), dtype=np.float32)
        selected = np.empty((b, t, num_experts), dtype=np.uint8)
        weights = np.empty((b, t, num_experts), dtype=np.float32)
        check(lib.dynmoe_trace_get_router_probs(handle, layer, _ptr(probs, ctypes.c_float), probs.size))
        check(lib.dynmoe_trace_get_selected(handle, layer, _ptr(selected, ctypes.c_uint8), selected.size))
        check(lib.dynmoe_trace_get_weights(handle, layer, _ptr(weights, ctypes.c_float), weights.size))
        trace[layer] = LayerTrace(probs, selected.astype(bool), weights)
    stats = read_stats(lib.dynmoe_trace_get_stats, handle)
    return trace, hidden, stats


def _forward_params(routing, record_trace: bool, logits_mode: int) -> _capi.dynmoe_forward_params:
    params = _capi.lib().dynmoe_forward_params_default()
    params.routing = routing
    params.record_trace = int(bool(record_trace))
    params.logits_mode = logits_mode
    return params


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class Model:
    """A loaded Mixture-of-Experts checkpoint.

    Weights are memory-mapped; a model is immutable and may be used from several threads at
    once. Use it as a context manager or call :meth:`close` to release it promptly (it is
    otherwise released when garbage-collected). Sessions keep their model alive. A model owns
    a library handle and cannot be copied or pickled (TypeError).

    Args:
        path: a Hugging Face checkpoint directory (config.json and safetensors).
        threads: compute threads, counting the caller; None = every online CPU.
        prefetch: read all weights into memory at load instead of on first use.
        lock_memory: pin the weights in memory (mlock) so the OS cannot evict them; needs a
            locked-memory limit (``ulimit -l``) above the checkpoint's size.
        progress: optional ``callable(fraction: float)`` called during loading.

    Raises:
        DynMoEError: the checkpoint could not be read (``DYNMOE_ERR_IO``), is malformed
            (``DYNMOE_ERR_FORMAT``) or is not supported (``DYNMOE_ERR_UNSUPPORTED``).
    """

    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = None, *, prefetch: bool = False,
                 lock_memory: bool = False, progress: Optional[Callable[[float], None]] = None):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        n_threads = 0 if threads is None else _check_int("threads", threads, 1)
        if progress is not None and not callable(progress):
            raise TypeError("progress must be callable")
        lib = _capi.lib()
        params = lib.dynmoe_load_params_default()
        params.n_threads = n_threads
        params.prefetch = int(bool(prefetch))
        params.lock_memory = int(bool(lock_memory))
        errors: list[BaseException] = []
        if progress is not None:
            def on_progress(fraction, _user_data):
                if not errors:
                    try:
                        progress(fraction)
                    except BaseException as exc:  # noqa: BLE001 - re-raised after loading
                        errors.append(exc)
            callback = _capi.dynmoe_progress_callback(on_progress)
            params.progress_callback = callback
        handle = _capi.dynmoe_model_p()
        check(lib.dynmoe_model_load(os.fsencode(path), params, handle))
        self._handle = handle
        self._finalizer = weakref.finalize(self, lib.dynmoe_model_free, handle)
        self._closed = False
        self._sessions: weakref.WeakSet = weakref.WeakSet()
        if errors:
            self.close()
            raise errors[0]
        self.path = os.fspath(path)
        self._info = self._read_info()

    def _read_info(self) -> ModelInfo:
        lib = _capi.lib()
        raw = _capi.dynmoe_model_info()
        check(lib.dynmoe_model_get_info(self._handle, raw))
        count = ctypes.c_size_t(0)
        check(lib.dynmoe_model_get_moe_layers(self._handle, None, 0, count))
        layers = np.zeros(count.value, dtype=np.int32)
        check(lib.dynmoe_model_get_moe_layers(self._handle, _ptr(layers, ctypes.c_int32), layers.size, count))
        return ModelInfo(
            family=raw.family.decode(), architecture=raw.architecture.decode(), num_layers=raw.num_layers,
            num_moe_layers=raw.num_moe_layers, moe_layers=tuple(int(x) for x in layers),
            num_experts=raw.num_experts, hidden_size=raw.hidden_size, vocab_size=raw.vocab_size,
            num_attention_heads=raw.num_attention_heads, num_key_value_heads=raw.num_key_value_heads,
            head_dim=raw.head_dim, max_position_embeddings=raw.max_position_embeddings,
            dtype=_DTYPE_NAMES.get(raw.dtype, str(raw.dtype)),
            native_mode=_MODE_NAMES.get(raw.native_mode, str(raw.native_mode)),
            native_top_k=raw.native_top_k, native_top_p=_shortest_float32(raw.native_top_p),
            native_renormalize=bool(raw.native_renormalize), has_shared_expert=bool(raw.has_shared_expert),
            bos_token_id=None if raw.bos_token_id < 0 else raw.bos_token_id,
            eos_token_id=None if raw.eos_token_id < 0 else raw.eos_token_id,
            total_parameters=raw.total_parameters, parameters_per_expert=raw.parameters_per_expert,
            always_active_parameters=raw.always_active_parameters)

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Closes the model. Idempotent.

        Sessions already created keep working; the library's model is released once the last
        of them is closed or garbage-collected too.
        """
        self._closed = True
        self._release_if_unused()

    def _release_if_unused(self) -> None:
        """Frees the library model once it is closed and has no open session (also called from
        a session's finalizer, when the dead session is no longer in ``_sessions``)."""
        if self._closed and not any(not session.closed for session in list(self._sessions)):
            self._finalizer()

    def __enter__(self) -> "Model":
        self._require_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> _capi.dynmoe_model_p:
        if self._closed:
            raise ValueError("model is closed")
        return self._handle

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._info.family}, {self._info.num_layers} layers"
        return f"<dynmoe.Model {self.path!r} ({state})>"

    # A copy would share the library handle but not the closed state; a pickle cannot carry it.
    __copy__ = __deepcopy__ = __reduce_ex__ = _refuse_copy

    # -- queries -----------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        """The model's :class:`ModelInfo`."""
        return self._info

    @property
    def moe_layers(self) -> tuple:
        """Indices of the layers with routed experts (``info.moe_layers``)."""
        return self._info.moe_layers

    # -- computation -------------------------------------------------------------------------

    def forward(self, ids, routing: Routing = None, trace: bool = False) -> ForwardOutput:
        """Runs the model over whole sequences from position 0 (no state is kept).

        Args:
            ids: token ids, [T] or [B, T] (list, tuple or numpy integer array).
            routing: None or "native" (the checkpoint's own rule), a :class:`TopK` /
                :class:`TopP` for every MoE layer, or a dict ``{layer: policy, "default": policy}``
                of per-layer policies (layers without an entry use "default", native if absent).
            trace: also return router probabilities, selections, weights, hidden states and
                the call's statistics.

        Returns:
            A :class:`ForwardOutput`; ``logits`` is float32 [B, T, V] — a 1-D `ids` gives
            [1, T, V].
        """
        handle = self._require_open()
        tokens, _ = _as_tokens(ids)
        parsed = parse_routing(routing)
        batch, length = tokens.shape
        logits = np.empty((batch, length, self._info.vocab_size), dtype=np.float32)
        lib = _capi.lib()
        trace_handle = _capi.dynmoe_trace_p()
        with routing_plan(handle, parsed) as plan:
            params = _forward_params(plan, trace, _capi.DYNMOE_LOGITS_ALL)
            check(lib.dynmoe_forward(handle, _ptr(tokens, ctypes.c_int32), batch, length, params,
                                     _ptr(logits, ctypes.c_float), logits.size, trace_handle if trace else None))
        if not trace:
            return ForwardOutput(logits)
        try:
            layers, hidden, stats = _read_trace(trace_handle, self._info.moe_layers, self._info.num_experts)
        finally:
            lib.dynmoe_trace_free(trace_handle)
        return ForwardOutput(logits, layers, hidden, stats)

    def stats(self) -> Stats:
        """Routing statistics of every call on this model (forwards and sessions) since load or reset."""
        return read_stats(_capi.lib().dynmoe_model_get_stats, self._require_open())

    def reset_stats(self) -> None:
        """Zeroes the model's accumulated statistics (sessions keep their own)."""
        check(_capi.lib().dynmoe_model_reset_stats(self._require_open()))

    def session(self, n_sequences: int = 1, capacity: Optional[int] = None, memory_budget: Optional[int] = None,
                routing: Routing = None, kv_dtype: str = "float32") -> "Session":
        """Creates a decoding :class:`Session` (a KV cache) on this model; see :class:`Session`."""
        return Session(self, n_sequences=n_sequences, capacity=capacity, memory_budget=memory_budget,
                       routing=routing, kv_dtype=kv_dtype)

    def generate(self, ids, max_new_tokens: int, routing: Routing = None, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Iterable[int] = (),
                 kv_dtype: str = "float32") -> np.ndarray:
        """Continues `ids` ([T] or [B, T]) by up to `max_new_tokens` tokens; greedy by default.

        A convenience over a temporary session with B sequences and room for T + max_new_tokens
        positions (its KV cache stored as `kv_dtype`, see :class:`Session`); the sampling
        arguments are those of :meth:`Session.generate`. T + max_new_tokens - 1 (the last new
        token is not evaluated) must not exceed the model's max_position_embeddings, else
        DynMoEError with status DYNMOE_ERR_CONTEXT_FULL (raised before anything is allocated,
        however large max_new_tokens is).

        Returns:
            int64 [B, N] new tokens (N = max_new_tokens unless every sequence hit a stop token).
        """
        self._require_open()
        tokens, _ = _as_tokens(ids)
        args = _generation_args(max_new_tokens, temperature, top_k, top_p, seed, stop_tokens)
        parsed = parse_routing(routing)
        batch, length = tokens.shape
        _context_full(0, length, args.max_new_tokens, self._info.max_position_embeddings)
        # Never past the trained range: the session refuses that, and generate then reports the
        # positions it needs (DYNMOE_ERR_CONTEXT_FULL) instead of a capacity the caller never set.
        capacity = min(length + max(args.max_new_tokens, 1), self._info.max_position_embeddings)
        with Session(self, n_sequences=batch, capacity=capacity, kv_dtype=kv_dtype) as session:
            return session._generate(tokens, args, parsed)


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


class Session:
    """Incremental decoding with a KV cache for `n_sequences` sequences advancing in lockstep.

    A session has a position (tokens in the cache), a default routing and its own statistics
    (calls also count towards the model's). Use one session from one thread at a time. Like a
    model, a session cannot be copied or pickled (TypeError).

    Args:
        model: the :class:`Model`; the session keeps it alive.
        n_sequences: the batch B of every call.
        capacity: positions the cache holds, at most the model's max_position_embeddings
            (DynMoEError otherwise); None = max_position_embeddings (capped by `memory_budget`).
        memory_budget: maximum KV-cache bytes; None = no limit beyond the capacity.
        routing: the session's default routing (see :meth:`Model.forward`).
        kv_dtype: how the KV cache stores keys and values: "float32" (exact), "float16" or
            "bfloat16" (half the memory, so twice the positions under `memory_budget`; each key
            and value is rounded to nearest even once, when stored).
    """

    def __init__(self, model: Model, n_sequences: int = 1, capacity: Optional[int] = None,
                 memory_budget: Optional[int] = None, routing: Routing = None, kv_dtype: str = "float32"):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a dynmoe.Model, got {type(model).__name__}")
        model_handle = model._require_open()
        lib = _capi.lib()
        params = lib.dynmoe_session_params_default()
        params.n_sequences = _check_int("n_sequences", n_sequences, 1)
        params.capacity = 0 if capacity is None else _check_int("capacity", capacity, 1)
        params.memory_budget_bytes = 0 if memory_budget is None else _check_int("memory_budget", memory_budget, 1,
                                                                                2**63 - 1)
        kv_codes = {name: code for code, name in _DTYPE_NAMES.items()}
        if kv_dtype not in kv_codes:
            raise ValueError(f"kv_dtype must be one of {', '.join(repr(n) for n in kv_codes)}, got {kv_dtype!r}")
        params.kv_dtype = kv_codes[kv_dtype]
        parsed = parse_routing(routing)
        handle = _capi.dynmoe_session_p()
        with routing_plan(model_handle, parsed) as plan:
            params.routing = plan
            check(lib.dynmoe_session_create(model_handle, params, handle))
        self._handle = handle
        # The finalizer holds the model (so the library model outlives the session), never the session.
        self._finalizer = weakref.finalize(self, _free_session, lib.dynmoe_session_free, handle, model)
        #: The session's :class:`Model` (kept alive, and not released while the session is open).
        self.model = model
        #: Sequences per call (the batch B).
        self.n_sequences = params.n_sequences
        #: How the KV cache stores keys and values ("float32", "float16" or "bfloat16").
        self.kv_dtype = kv_dtype
        self._streams: set = set()
        model._sessions.add(self)

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Releases the session's cache (stopping any active :meth:`stream` first). Idempotent."""
        for control in list(self._streams):
            control.finish()
        self._finalizer()  # also releases a closed model whose last session this was

    def __enter__(self) -> "Session":
        self._require_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> _capi.dynmoe_session_p:
        if not self._finalizer.alive:
            raise ValueError("session is closed")
        return self._handle

    def __repr__(self) -> str:
        if self.closed:
            return "<dynmoe.Session (closed)>"
        return (f"<dynmoe.Session n_sequences={self.n_sequences} position={self.position} capacity={self.capacity} "
                f"kv_dtype={self.kv_dtype}>")

    __copy__ = __deepcopy__ = __reduce_ex__ = _refuse_copy

    # -- state -------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Positions in the cache: tokens evaluated since creation or the last rewind."""
        out = ctypes.c_int32()
        check(_capi.lib().dynmoe_session_get_position(self._require_open(), out))
        return out.value

    @property
    def capacity(self) -> int:
        """Positions the cache can hold."""
        out = ctypes.c_int32()
        check(_capi.lib().dynmoe_session_get_capacity(self._require_open(), out))
        return out.value

    def rewind(self, position: int) -> None:
        """Truncates the cache to `position` tokens (0 empties it); later calls continue from there."""
        check(_capi.lib().dynmoe_session_rewind(self._require_open(), _check_int("position", position, 0)))

    def set_routing(self, routing: Routing) -> None:
        """Replaces the session's default routing (None = native); the cache is kept."""
        handle = self._require_open()
        parsed = parse_routing(routing)
        with routing_plan(self.model._handle, parsed) as plan:
            check(_capi.lib().dynmoe_session_set_routing(handle, plan))

    def stats(self) -> Stats:
        """Statistics of this session's calls since creation or :meth:`reset_stats`."""
        return read_stats(_capi.lib().dynmoe_session_get_stats, self._require_open())

    def reset_stats(self) -> None:
        """Zeroes this session's statistics and its :meth:`timing`."""
        check(_capi.lib().dynmoe_session_reset_stats(self._require_open()))

    def timing(self) -> Timing:
        """Where this session's forward time went since creation or :meth:`reset_stats`, e.g.
        ``t.moe_seconds / t.passes`` is the experts' share of a decode step."""
        out = _capi.dynmoe_timing()
        check(_capi.lib().dynmoe_session_get_timing(self._require_open(), ctypes.byref(out)))
        return Timing(**{name: getattr(out, name) for name, _ in out._fields_})

    # -- computation -------------------------------------------------------------------------

    def _tokens(self, ids, name: str, allow_empty: bool = False) -> np.ndarray:
        tokens, one_d = _as_tokens(ids, name, allow_empty=allow_empty)
        if one_d and tokens.shape[1] == 0:
            tokens = np.zeros((self.n_sequences, 0), dtype=np.int32)
        if tokens.shape[0] != self.n_sequences:
            hint = " (a 1-D array is one sequence; pass [B, T], e.g. ids[:, None] for one token each)" if one_d else ""
            count = f"{tokens.shape[0]} sequence{'' if tokens.shape[0] == 1 else 's'}"
            raise ValueError(f"{name} has {count}, the session has {self.n_sequences}{hint}")
        return tokens

    def eval(self, ids, routing: Routing = None, all_logits: bool = False,
             trace: bool = False) -> Union[np.ndarray, ForwardOutput]:
        """Appends tokens to every sequence (prefill when T > 1, decode when T = 1).

        Args:
            ids: [B, T] token ids with B = n_sequences; a 1-D [T] array when n_sequences is 1.
            routing: overrides the session's default routing for this call only; None uses the
                default, "native" forces the checkpoint's rule (see :meth:`Model.forward`).
            all_logits: return the logits of every new position instead of the last one.
            trace: record a trace, as :meth:`Model.forward` does.

        Returns:
            float32 logits, [B, V] (last position) or [B, T, V] with `all_logits`; with `trace`,
            a :class:`ForwardOutput` holding those logits, the trace and the call's statistics.
        """
        handle = self._require_open()
        tokens = self._tokens(ids, "ids")
        parsed = parse_routing(routing)
        batch, length = tokens.shape
        vocab = self.model.info.vocab_size
        shape = (batch, length, vocab) if all_logits else (batch, vocab)
        logits = np.empty(shape, dtype=np.float32)
        mode = _capi.DYNMOE_LOGITS_ALL if all_logits else _capi.DYNMOE_LOGITS_LAST
        lib = _capi.lib()
        trace_handle = _capi.dynmoe_trace_p()
        with routing_plan(self.model._handle, parsed) as plan:
            params = _forward_params(plan, trace, mode)
            check(lib.dynmoe_session_eval(handle, _ptr(tokens, ctypes.c_int32), length, params,
                                          _ptr(logits, ctypes.c_float), logits.size, trace_handle if trace else None))
        if not trace:
            return logits
        info = self.model.info
        try:
            layers, hidden, stats = _read_trace(trace_handle, info.moe_layers, info.num_experts)
        finally:
            lib.dynmoe_trace_free(trace_handle)
        return ForwardOutput(logits, layers, hidden, stats)

    def generate(self, prompt_ids, max_new_tokens: int, routing: Routing = None, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Iterable[int] = ()) -> np.ndarray:
        """Evaluates `prompt_ids` and generates up to `max_new_tokens` tokens per sequence.

        Args:
            prompt_ids: [B, T] (or [T] for one sequence); may be empty ([] or [B, 0]) to continue
                from the cache.
            max_new_tokens: steps to generate. position + T + max_new_tokens - 1 must not exceed
                the capacity, else DynMoEError DYNMOE_ERR_CONTEXT_FULL (before anything runs).
            routing: overrides the session's default routing for this call (as in :meth:`eval`).
            temperature: keyword-only, as are the next ones. 0 = greedy (argmax); otherwise the
                logits are divided by it and sampled (a float32 1/temperature must be finite).
            top_k: sample among the k most likely tokens only; 0 = all.
            top_p: sample among the smallest set of tokens whose probability exceeds it; 1 = all.
            seed: seed of the sampler; the same seed gives the same tokens. One generator serves
                the whole call, drawing for the sequences in turn, so a sequence's samples depend
                on the rest of the batch.
            stop_tokens: generation stops once every sequence has produced one of these; a
                stopped sequence's later slots repeat its stop token.

        Returns:
            int64 [B, N] generated tokens, N <= max_new_tokens (smaller only when every sequence
            stopped early).

        Changed in 0.5.0: `routing` is the third parameter (as in :meth:`Model.generate`) and the
        sampling options are keyword-only; before, `routing` came last.
        """
        self._require_open()
        tokens = self._tokens(prompt_ids, "prompt_ids", allow_empty=True)
        args = _generation_args(max_new_tokens, temperature, top_k, top_p, seed, stop_tokens)
        return self._generate(tokens, args, parse_routing(routing))

    def _generate(self, tokens: np.ndarray, args: _Generation, parsed, callback=None) -> np.ndarray:
        handle = self._require_open()
        batch, length = tokens.shape
        _context_full(self.position, length, args.max_new_tokens, self.capacity)
        out = np.zeros((batch, args.max_new_tokens), dtype=np.int32)
        steps = ctypes.c_int32(0)
        lib = _capi.lib()
        with routing_plan(self.model._handle, parsed) as plan:
            params = _forward_params(plan, False, _capi.DYNMOE_LOGITS_DEFAULT)
            check(lib.dynmoe_session_generate(
                handle, _ptr(tokens, ctypes.c_int32), length, args.max_new_tokens, args.sampling,
                _ptr(args.stop, ctypes.c_int32) if args.stop.size else None, args.stop.size, params,
                callback or _capi.dynmoe_token_callback(), None, _ptr(out, ctypes.c_int32), out.size, steps))
        return out[:, : steps.value].astype(np.int64)

    def stream(self, prompt_ids, max_new_tokens: int, routing: Routing = None, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop_tokens: Iterable[int] = ()) -> Iterator[np.ndarray]:
        """Like :meth:`generate`, but yields each step's tokens (int64 [B]) as soon as it is sampled.

        The same arguments give the same tokens as :meth:`generate`. Generation runs on a helper
        thread through ``dynmoe_session_generate``'s token callback and advances one step per
        item consumed; closing the iterator early (``break``) stops it after the current step.
        The session is busy until the iterator is exhausted or closed. Arguments are validated
        when ``stream`` is called; library errors (DYNMOE_ERR_CONTEXT_FULL included) are raised
        by the first ``next()``.
        """
        self._require_open()
        tokens = self._tokens(prompt_ids, "prompt_ids", allow_empty=True)
        args = _generation_args(max_new_tokens, temperature, top_k, top_p, seed, stop_tokens)
        parsed = parse_routing(routing)
        return self._stream(tokens, args, parsed)

    def _stream(self, tokens: np.ndarray, args: _Generation, parsed) -> Iterator[np.ndarray]:
        items: queue.Queue = queue.Queue()
        control = _StreamControl()

        def on_token(tokens_ptr, n_sequences, _step, _user_data):
            try:
                items.put(("token", np.ctypeslib.as_array(tokens_ptr, shape=(n_sequences,)).astype(np.int64)))
                control.wanted.acquire()  # wait until the consumer asks for the next step
                return 1 if control.stop.is_set() else 0
            except BaseException as exc:  # noqa: BLE001 - never let an exception cross into C
                items.put(("error", exc))
                return 1

        callback = _capi.dynmoe_token_callback(on_token)

        def run():
            try:
                self._generate(tokens, args, parsed, callback)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                items.put(("error", exc))
            else:
                items.put(("done", None))

        control.worker = threading.Thread(target=run, name="dynmoe-stream", daemon=True)
        self._streams.add(control)
        control.worker.start()
        try:
            while True:
                kind, value = items.get()
                if kind == "token":
                    yield value
                    control.wanted.release()
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            control.finish()
            self._streams.discard(control)


def _free_session(free, handle, model: Model) -> None:
    """A session's finalizer (run by close() or when the session is garbage-collected): frees the
    library session, then the model if the model is closed and this was its last open session."""
    free(handle)
    model._release_if_unused()


class _StreamControl:
    """Hand-over between a stream's consumer and its generating thread."""

    def __init__(self):
        self.wanted = threading.Semaphore(0)  # released by the consumer for each further step
        self.stop = threading.Event()
        self.worker: Optional[threading.Thread] = None

    def finish(self) -> None:
        """Asks the generation to stop after the current step and waits for it to end."""
        self.stop.set()
        self.wanted.release()
        if self.worker is not None and self.worker is not threading.current_thread():
            self.worker.join()
