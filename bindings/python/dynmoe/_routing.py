"""Expert-routing policies and their conversion to C routing plans."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from . import _capi
from ._errors import check

_INT32_MAX = 2**31 - 1


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be in [{minimum}, {_INT32_MAX}], got {value}")


def _check_renormalize(value) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"renormalize must be None, True or False, got {type(value).__name__}")


def _renormalize_code(value: Optional[bool]) -> int:
    return _capi.DYNMOE_RENORMALIZE_NATIVE if value is None else int(value)


@dataclass(frozen=True)
class TopK:
    """Route each token to its `k` most probable experts.

    Args:
        k: experts per token, at least 1 (the library checks ``k <= num_experts``).
        renormalize: divide the chosen experts' weights by their sum (True), use the raw router
            probabilities (False), or do what the checkpoint's native routing does (None).
    """

    k: int
    renormalize: Optional[bool] = None

    def __post_init__(self):
        _check_int("TopK.k", self.k, 1)
        _check_renormalize(self.renormalize)

    def _to_c(self) -> _capi.dynmoe_policy:
        return _capi.dynmoe_policy(mode=_capi.DYNMOE_ROUTING_TOP_K, k=int(self.k), threshold=0.0,
                                   min_experts=0, max_experts=0,
                                   renormalize=_renormalize_code(self.renormalize))


@dataclass(frozen=True)
class TopP:
    """Dynamic (top-p) routing: the fewest experts whose probabilities sum to more than `p`.

    The router's probabilities are sorted in descending order and the shortest prefix whose
    cumulative sum is strictly greater than `p` is kept (all experts if none is); its length is
    then clamped to ``[min_experts, max_experts]``.

    Args:
        p: the threshold, in (0, 1] (also once rounded to float32: ``TopP(1e-50)`` is a ValueError).
        min_experts: at least this many experts per token (None: 1).
        max_experts: at most this many experts per token (None: all).
        renormalize: as for :class:`TopK`.
    """

    p: float
    min_experts: Optional[int] = None
    max_experts: Optional[int] = None
    renormalize: Optional[bool] = None

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real):
            raise TypeError(f"TopP.p must be a float, got {type(self.p).__name__}")
        if not 0.0 < float(self.p) <= 1.0:  # also rejects NaN
            raise ValueError(f"TopP.p must be in (0, 1], got {self.p}")
        if not np.float32(self.p) > 0:  # the library's threshold is a float32
            raise ValueError(f"TopP.p must be in (0, 1], also as a float32, got {self.p!r} (float32: 0.0)")
        for name in ("min_experts", "max_experts"):
            value = getattr(self, name)
            if value is not None:
                _check_int(f"TopP.{name}", value, 1)
        if self.min_experts is not None and self.max_experts is not None and self.min_experts > self.max_experts:
            raise ValueError(f"TopP.min_experts ({self.min_experts}) is greater than max_experts ({self.max_experts})")
        _check_renormalize(self.renormalize)

    def _to_c(self) -> _capi.dynmoe_policy:
        return _capi.dynmoe_policy(mode=_capi.DYNMOE_ROUTING_TOP_P, k=0, threshold=float(self.p),
                                   min_experts=int(self.min_experts or 0), max_experts=int(self.max_experts or 0),
                                   renormalize=_renormalize_code(self.renormalize))


#: One layer's policy: None or "native" for the checkpoint's own rule, or a TopK / TopP.
Policy = Union[None, str, TopK, TopP]
#: A routing argument: a policy for every MoE layer, or ``{layer: policy, "default": policy}``.
Routing = Union[Policy, Mapping]


def _native() -> _capi.dynmoe_policy:
    return _capi.dynmoe_policy(mode=_capi.DYNMOE_ROUTING_NATIVE, k=0, threshold=0.0, min_experts=0,
                               max_experts=0, renormalize=_capi.DYNMOE_RENORMALIZE_NATIVE)


def policy_to_c(policy: Policy) -> Optional[_capi.dynmoe_policy]:
    """The C struct of a policy; None for native routing. Raises TypeError/ValueError."""
    if policy is None:
        return None
    if isinstance(policy, str):
        if policy == "native":
            return None
        raise ValueError(f"unknown routing policy {policy!r}; use 'native', dynmoe.TopK(k) or dynmoe.TopP(p)")
    if isinstance(policy, (TopK, TopP)):
        return policy._to_c()
    raise TypeError(
        f"a routing policy must be None, 'native', dynmoe.TopK or dynmoe.TopP, got {type(policy).__name__}")


def parse_routing(routing: Routing):
    """Validates a routing argument; returns None or ``(default, {layer: policy})`` of C structs.

    None (no routing given) maps to no plan at all: native routing for a forward pass, the
    session's default routing for a session call. Anything else, "native" included, maps to a
    complete plan whose `default` (None = native) covers the layers without their own entry;
    a per-layer value of None or "native" is an explicit native policy for that layer.
    """
    if routing is None:
        return None
    if not isinstance(routing, Mapping):
        return policy_to_c(routing), {}
    default = None
    layers: dict[int, _capi.dynmoe_policy] = {}
    for key, value in routing.items():
        if isinstance(key, str):
            if key != "default":
                raise ValueError(f"unknown routing key {key!r}; keys are layer indices and 'default'")
            default = policy_to_c(value)
        elif isinstance(key, numbers.Integral) and not isinstance(key, bool):
            if not -(2**31) <= key <= _INT32_MAX:
                raise ValueError(f"routing layer index {key} is out of range")
            layers[int(key)] = policy_to_c(value) or _native()
        else:
            raise TypeError(f"routing keys must be layer indices (int) or 'default', got {type(key).__name__}")
    return default, layers


@contextlib.contextmanager
def routing_plan(model_handle, parsed) -> Iterator[Optional[_capi.dynmoe_routing_p]]:
    """A C routing plan for `parsed` (from :func:`parse_routing`), freed on exit; None for None."""
    if parsed is None:
        yield None
        return
    lib = _capi.lib()
    default, layers = parsed
    handle = _capi.dynmoe_routing_p()
    check(lib.dynmoe_routing_create(model_handle, default, handle))
    try:
        for layer, policy in layers.items():
            check(lib.dynmoe_routing_set_layer(handle, layer, policy))
        yield handle
    finally:
        lib.dynmoe_routing_free(handle)
