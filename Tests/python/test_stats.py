"""Accumulated statistics, resets and the JSON/dict/repr renderings."""

import json

import numpy as np

import dynmoe
from conftest import reference


def test_stats_accumulate_over_calls(models, fixture_name):
    ref = reference(fixture_name)
    model = models(fixture_name)
    model.reset_stats()
    first = model.forward(ref.input_ids, trace=True).stats
    second = model.forward(ref.input_ids[:, :5], routing=dynmoe.TopK(1), trace=True).stats
    total = model.stats()
    assert total.tokens == first.tokens + second.tokens == ref.input_ids.size + ref.input_ids.shape[0] * 5
    for layer in model.info.moe_layers:
        got, a, b = total.layers[layer], first.layers[layer], second.layers[layer]
        np.testing.assert_array_equal(got.expert_token_counts, a.expert_token_counts + b.expert_token_counts)
        np.testing.assert_array_equal(got.experts_per_token_histogram,
                                      a.experts_per_token_histogram + b.experts_per_token_histogram)
        np.testing.assert_allclose(got.expert_weight_sums, a.expert_weight_sums + b.expert_weight_sums, rtol=1e-9)
        assert got.tokens == a.tokens + b.tokens
        expected_mean = (a.mean_experts_per_token * a.tokens + b.mean_experts_per_token * b.tokens) / got.tokens
        assert abs(got.mean_experts_per_token - expected_mean) < 1e-9
        assert b.mean_experts_per_token == 1.0
        assert got.expert_token_counts.sum() == (got.experts_per_token_histogram * np.arange(got.num_experts + 1)).sum()


def test_reset_zeroes(mixtral):
    mixtral.forward([[1, 2, 3]])
    assert mixtral.stats().tokens == 3
    mixtral.reset_stats()
    stats = mixtral.stats()
    assert stats.tokens == 0
    for layer in stats.moe_layers:
        assert layer.tokens == 0
        assert not layer.expert_token_counts.any()
        assert not layer.experts_per_token_histogram.any()
        assert not layer.expert_weight_sums.any()
        assert layer.busiest_expert is None and layer.idlest_expert is None


def test_stats_fields(models):
    ref = reference("qwen2moe-tiny")
    model = models("qwen2moe-tiny")
    info = model.info
    stats = model.forward(ref.input_ids, trace=True).stats
    assert (stats.num_layers, stats.num_moe_layers) == (info.num_layers, info.num_moe_layers)
    assert stats.total_parameters == info.total_parameters
    assert len(stats.layers) == info.num_layers
    assert [layer.layer for layer in stats.layers] == list(range(info.num_layers))
    dense = stats.layers[1]
    assert not dense.is_moe and dense.expert_token_counts is None
    moe_used = sum(layer.mean_experts_per_token for layer in stats.moe_layers)
    expected = info.always_active_parameters + info.parameters_per_expert * moe_used
    assert abs(stats.activated_parameters_per_token - expected) < 1e-6 * expected
    assert abs(stats.activated_parameter_fraction - expected / info.total_parameters) < 1e-9
    for layer in stats.moe_layers:
        counts = layer.expert_token_counts
        assert counts.dtype == np.int64 and counts.shape == (info.num_experts,)
        assert layer.experts_per_token_histogram.shape == (info.num_experts + 1,)
        assert layer.expert_weight_sums.dtype == np.float64
        assert layer.busiest_expert == int(np.argmax(counts)) and layer.idlest_expert == int(np.argmin(counts))
        assert abs(layer.load_max_over_mean - counts.max() / counts.mean()) < 1e-9
        assert abs(layer.load_coefficient_of_variation - counts.std() / counts.mean()) < 1e-9
        assert 0 < layer.mean_kept_mass <= 1 and layer.mean_router_entropy > 0
        assert not counts.flags.writeable


def test_json_round_trip(mixtral):
    ref = reference("mixtral-tiny")
    mixtral.forward(ref.input_ids)
    stats = mixtral.stats()
    text = stats.to_json()
    assert isinstance(text, str)
    data = json.loads(text)
    assert data == stats.to_dict()
    assert data["schema"] == "dynmoe.stats"
    assert data["version"] == 1
    assert data["summary"]["tokens"] == stats.tokens == ref.input_ids.size
    assert abs(data["summary"]["mean_experts_per_token"] - stats.mean_experts_per_token) < 1e-12
    by_layer = {entry["layer"]: entry for entry in data["layers"]}
    for layer in stats.moe_layers:
        assert by_layer[layer.layer]["expert_token_counts"] == layer.expert_token_counts.tolist()
        assert by_layer[layer.layer]["experts_per_token_histogram"] == layer.experts_per_token_histogram.tolist()


def test_repr(models):
    model = models("dynamic-moe-tiny")
    stats = model.forward(reference("dynamic-moe-tiny").input_ids, trace=True).stats
    text = repr(stats)
    assert text.startswith("Stats(tokens=24")
    lines = text.splitlines()
    assert "layer" in lines[1] and "experts/tok" in lines[1]
    assert len(lines) == 2 + len(model.info.moe_layers)
    assert "LayerStats(layer=0" in repr(stats.layers[0])
    assert repr(stats.layers[1]) == "LayerStats(layer=1, is_moe=False)"
    empty = dynmoe.Model(reference("dynamic-moe-tiny").model_dir)
    try:
        assert "tokens=0" in repr(empty.stats())
    finally:
        empty.close()
