"""Routing statistics snapshots (``dynmoe_stats``) as plain Python objects."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _capi
from ._errors import check


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Routing figures of one decoder layer.

    For a layer without routed experts (``is_moe`` False) only ``layer`` and ``is_moe`` are
    meaningful; the arrays are None and the figures zero.

    Attributes:
        layer: decoder layer index.
        is_moe: whether the layer has routed experts.
        num_experts: routed experts E.
        tokens: token positions routed through the layer.
        expert_token_counts: int64 [E], tokens routed to each expert.
        expert_weight_sums: float64 [E], sum of the routing weights each expert received.
        experts_per_token_histogram: int64 [E + 1], entry n = tokens that used n experts.
        mean_experts_per_token: mean experts used per token.
        mean_router_entropy: mean entropy of the router distribution, in nats.
        mean_kept_mass: mean probability mass of the chosen experts.
        load_max_over_mean: busiest expert's count over the mean count (1 = balanced).
        load_coefficient_of_variation: standard deviation of the counts over their mean.
        busiest_expert, idlest_expert: expert indices (lowest on ties), None without tokens.
    """

    layer: int
    is_moe: bool
    num_experts: int
    tokens: int
    mean_experts_per_token: float
    mean_router_entropy: float
    mean_kept_mass: float
    load_max_over_mean: float
    load_coefficient_of_variation: float
    busiest_expert: Optional[int]
    idlest_expert: Optional[int]
    activated_parameters_per_token: float
    expert_token_counts: Optional[np.ndarray]
    expert_weight_sums: Optional[np.ndarray]
    experts_per_token_histogram: Optional[np.ndarray]

    def __repr__(self) -> str:
        if not self.is_moe:
            return f"LayerStats(layer={self.layer}, is_moe=False)"
        return (f"LayerStats(layer={self.layer}, tokens={self.tokens}, "
                f"mean_experts_per_token={self.mean_experts_per_token:.4g}, "
                f"expert_token_counts={self.expert_token_counts.tolist()})")


@dataclass(frozen=True, eq=False, repr=False)
class Stats:
    """A snapshot of routing statistics: of one call, of a model since load/reset, or of a session.

    Attributes:
        tokens: token positions processed (B x T summed over calls).
        mean_experts_per_token: mean over MoE layers of each layer's mean experts per token.
        activated_parameters_per_token: always-active parameters + experts run x parameters per
            expert, per token.
        activated_parameter_fraction: activated_parameters_per_token / total_parameters.
        total_parameters, num_layers, num_moe_layers: of the model.
        layers: one :class:`LayerStats` per decoder layer, indexed by layer (dense ones included).
    """

    tokens: int
    mean_experts_per_token: float
    activated_parameters_per_token: float
    activated_parameter_fraction: float
    total_parameters: int
    num_layers: int
    num_moe_layers: int
    layers: tuple
    _json: str

    @property
    def moe_layers(self) -> tuple:
        """The :class:`LayerStats` of the MoE layers only."""
        return tuple(layer for layer in self.layers if layer.is_moe)

    def to_json(self) -> str:
        """The library's JSON rendering of the snapshot (``dynmoe_stats_to_json``, schema "dynmoe.stats")."""
        return self._json

    def to_dict(self) -> dict[str, Any]:
        """``json.loads(self.to_json())``."""
        return json.loads(self._json)

    def __repr__(self) -> str:
        head = (f"Stats(tokens={self.tokens}, mean_experts_per_token={self.mean_experts_per_token:.4f}, "
                f"activated_parameters_per_token={self.activated_parameters_per_token:.1f}, "
                f"activated_parameter_fraction={self.activated_parameter_fraction:.4f})")
        columns = ("layer", "tokens", "experts/tok", "entropy", "kept_mass", "max/mean", "cv", "busiest", "idlest")
        rows = [columns]
        for s in self.moe_layers:
            rows.append((str(s.layer), str(s.tokens), f"{s.mean_experts_per_token:.3f}",
                         f"{s.mean_router_entropy:.3f}", f"{s.mean_kept_mass:.3f}", f"{s.load_max_over_mean:.3f}",
                         f"{s.load_coefficient_of_variation:.3f}",
                         "-" if s.busiest_expert is None else str(s.busiest_expert),
                         "-" if s.idlest_expert is None else str(s.idlest_expert)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
        return head + "\n" + "\n".join("  " + line for line in lines)

    @classmethod
    def _from_handle(cls, handle: _capi.dynmoe_stats_p) -> "Stats":
        """Reads every figure of a ``dynmoe_stats`` snapshot (the caller still frees it)."""
        lib = _capi.lib()
        summary = _capi.dynmoe_stats_summary()
        check(lib.dynmoe_stats_get_summary(handle, summary))
        layers = []
        for index in range(summary.num_layers):
            raw = _capi.dynmoe_layer_stats()
            check(lib.dynmoe_stats_get_layer(handle, index, raw))
            counts = weight_sums = histogram = None
            if raw.is_moe:
                experts = raw.num_experts
                counts = np.zeros(experts, dtype=np.int64)
                weight_sums = np.zeros(experts, dtype=np.float64)
                histogram = np.zeros(experts + 1, dtype=np.int64)
                check(lib.dynmoe_stats_get_expert_counts(handle, index, _ptr(counts, ctypes.c_int64), counts.size))
                check(lib.dynmoe_stats_get_expert_weight_sums(handle, index, _ptr(weight_sums, ctypes.c_double),
                                                              weight_sums.size))
                check(lib.dynmoe_stats_get_histogram(handle, index, _ptr(histogram, ctypes.c_int64), histogram.size))
                for array in (counts, weight_sums, histogram):
                    array.flags.writeable = False
            layers.append(LayerStats(
                layer=raw.layer, is_moe=bool(raw.is_moe), num_experts=raw.num_experts, tokens=raw.tokens,
                mean_experts_per_token=raw.mean_experts_per_token, mean_router_entropy=raw.mean_router_entropy,
                mean_kept_mass=raw.mean_kept_mass, load_max_over_mean=raw.load_max_over_mean,
                load_coefficient_of_variation=raw.load_coefficient_of_variation,
                busiest_expert=None if raw.busiest_expert < 0 else raw.busiest_expert,
                idlest_expert=None if raw.idlest_expert < 0 else raw.idlest_expert,
                activated_parameters_per_token=raw.activated_parameters_per_token,
                expert_token_counts=counts, expert_weight_sums=weight_sums, experts_per_token_histogram=histogram))
        return cls(tokens=summary.tokens, mean_experts_per_token=summary.mean_experts_per_token,
                   activated_parameters_per_token=summary.activated_parameters_per_token,
                   activated_parameter_fraction=summary.activated_parameter_fraction,
                   total_parameters=summary.total_parameters, num_layers=summary.num_layers,
                   num_moe_layers=summary.num_moe_layers, layers=tuple(layers), _json=_to_json(handle))


def _ptr(array: np.ndarray, ctype):
    return array.ctypes.data_as(ctypes.POINTER(ctype))


def _to_json(handle: _capi.dynmoe_stats_p) -> str:
    lib = _capi.lib()
    length = ctypes.c_size_t(0)
    check(lib.dynmoe_stats_to_json(handle, None, 0, length))
    buffer = ctypes.create_string_buffer(length.value + 1)
    check(lib.dynmoe_stats_to_json(handle, buffer, len(buffer), length))
    return buffer.raw[: length.value].decode("utf-8")


def read_stats(getter, *args) -> Stats:
    """Calls a ``dynmoe_*_get_stats(..., dynmoe_stats **out)`` function and converts its snapshot."""
    lib = _capi.lib()
    handle = _capi.dynmoe_stats_p()
    check(getter(*args, handle))
    try:
        return Stats._from_handle(handle)
    finally:
        lib.dynmoe_stats_free(handle)
