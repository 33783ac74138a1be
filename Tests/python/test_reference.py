"""Forward passes, traces, statistics and greedy decoding against the reference fixtures."""

import numpy as np

import dynmoe
from conftest import (assert_logits_close, assert_stats_match, policy_from_reference, reference, rel_l2)

FAMILIES = {"paper": "dynamic_moe"}


def test_info(models, fixture_name):
    ref = reference(fixture_name)
    info = models(fixture_name).info
    assert info.family == FAMILIES.get(ref.meta["family"], ref.meta["family"])
    assert list(info.moe_layers) == ref.meta["moe_layers"]
    assert info.num_moe_layers == len(info.moe_layers)
    assert info.dtype == ref.meta["weights_dtype"]
    native = ref.tensor("native", "logits")
    assert info.vocab_size == native.shape[-1]
    assert info.hidden_size == ref.tensor("native", "hidden", 0).shape[-1]
    assert info.num_experts == ref.tensor("native", "router_probs", info.moe_layers[0]).shape[-1]
    assert info.num_layers == sum(1 for key in ref.tensors if key.startswith("native.hidden."))
    assert info.total_parameters > info.always_active_parameters > 0
    assert info.parameters_per_expert > 0
    assert isinstance(info.native_policy, (dynmoe.TopK, dynmoe.TopP))


def test_forward_matches_reference(models, fixture_run):
    name, run_name = fixture_run
    ref = reference(name)
    run = ref.runs[run_name]
    model = models(name)
    info = model.info
    routing = policy_from_reference(run["routing"])

    model.reset_stats()
    out = model.forward(ref.input_ids, routing=routing, trace=True)

    assert out.logits.dtype == np.float32
    assert_logits_close(out.logits, ref.tensor(run_name, "logits"), ref.meta["tolerance"])
    assert len(out.hidden) == info.num_layers
    for layer in range(info.num_layers):
        err = rel_l2(out.hidden[layer], ref.tensor(run_name, "hidden", layer))
        assert err <= 1e-4, f"hidden state of layer {layer}: relative L2 error {err:.3g}"
    assert sorted(out.trace) == list(info.moe_layers)
    for layer in info.moe_layers:
        trace = out.trace[layer]
        probs = ref.tensor(run_name, "router_probs", layer)
        assert trace.router_probs.shape == probs.shape
        np.testing.assert_allclose(trace.router_probs, probs, rtol=0, atol=1e-4, err_msg=f"router probs {layer}")
        assert trace.selected.dtype == np.bool_
        np.testing.assert_array_equal(trace.selected, ref.tensor(run_name, "selected", layer).astype(bool),
                                      err_msg=f"selected experts of layer {layer}")
        np.testing.assert_allclose(trace.weights, ref.tensor(run_name, "weights", layer), rtol=0, atol=1e-4,
                                   err_msg=f"weights of layer {layer}")
        np.testing.assert_array_equal(trace.experts_per_token, trace.selected.sum(-1))

    assert_stats_match(out.stats, run["stats"], "out.stats")
    assert out.stats.tokens == ref.input_ids.size
    assert_stats_match(model.stats(), run["stats"], "model.stats() after reset")


def test_forward_one_dimensional_ids(models):
    ref = reference("mixtral-tiny")
    model = models("mixtral-tiny")
    out = model.forward(ref.input_ids[1].tolist())
    assert out.logits.shape == (1, ref.input_ids.shape[1], model.info.vocab_size)
    assert out.trace is None and out.hidden is None and out.stats is None
    assert_logits_close(out.logits[0], ref.tensor("native", "logits")[1])


def test_forward_accepts_int_types(models):
    ref = reference("olmoe-tiny")
    model = models("olmoe-tiny")
    expected = ref.tensor("native", "logits")
    for ids in (ref.input_ids, ref.input_ids.astype(np.uint8), tuple(map(tuple, ref.input_ids.tolist())),
                np.asfortranarray(ref.input_ids.astype(np.int32)), ref.input_ids[:, ::1]):
        assert_logits_close(model.forward(ids).logits, expected)


def test_per_layer_routing_dict(models):
    """A dict routing applies each policy to its layer only (layer 0's input does not depend on routing)."""
    ref = reference("mixtral-tiny")
    model = models("mixtral-tiny")
    out = model.forward(ref.input_ids, routing={1: dynmoe.TopK(1), "default": dynmoe.TopP(0.5)}, trace=True)
    np.testing.assert_array_equal(out.trace[0].selected, ref.tensor("top_p_0.5", "selected", 0).astype(bool))
    assert (out.trace[1].experts_per_token == 1).all()
    # A None or "native" value overrides the default with the native rule for that layer.
    for native in (None, "native"):
        out = model.forward(ref.input_ids, routing={"default": dynmoe.TopK(1), 0: native}, trace=True)
        np.testing.assert_array_equal(out.trace[0].selected, ref.tensor("native", "selected", 0).astype(bool))
        assert (out.trace[1].experts_per_token == 1).all()
    # Layer-wise policies equal to a run's give the run's logits.
    out = model.forward(ref.input_ids, routing={0: dynmoe.TopK(1), 1: dynmoe.TopK(1)})
    assert_logits_close(out.logits, ref.tensor("top_k_1", "logits"))
    out = model.forward(ref.input_ids, routing={"default": "native"})
    assert_logits_close(out.logits, ref.tensor("native", "logits"))


def test_native_policy_equals_native(models, fixture_name):
    ref = reference(fixture_name)
    model = models(fixture_name)
    out = model.forward(ref.input_ids, routing=model.info.native_policy)
    assert_logits_close(out.logits, ref.tensor("native", "logits"))


def test_greedy_matches_reference(models, greedy_run):
    name, run_name = greedy_run
    ref = reference(name)
    run = ref.runs[run_name]
    expected = ref.tensor(run_name, "greedy")
    assert expected.shape[1] == run["greedy_steps"]
    tokens = models(name).generate(ref.input_ids, run["greedy_steps"], routing=policy_from_reference(run["routing"]))
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, expected)
