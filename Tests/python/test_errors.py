"""Error reporting: library errors as DynMoEError, Python-side validation, closed objects."""

import numpy as np
import pytest

import dynmoe
from conftest import reference


def test_bad_path_is_an_io_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(dynmoe.DynMoEError) as info:
        dynmoe.Model(missing)
    error = info.value
    assert error.status == 2
    assert error.status_name == "DYNMOE_ERR_IO"
    assert str(missing) in error.message
    assert str(missing) in str(error)


def test_malformed_checkpoint_is_a_format_error(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(dynmoe.DynMoEError) as info:
        dynmoe.Model(tmp_path)
    assert info.value.status_name in ("DYNMOE_ERR_FORMAT", "DYNMOE_ERR_IO")
    assert info.value.message


def test_token_out_of_vocabulary(mixtral):
    vocab = mixtral.info.vocab_size
    with pytest.raises(dynmoe.DynMoEError) as info:
        mixtral.forward([1, 2, vocab])
    assert info.value.status_name == "DYNMOE_ERR_INVALID_ARGUMENT"
    assert str(vocab) in info.value.message
    with pytest.raises(dynmoe.DynMoEError, match="-1"):
        mixtral.forward([[1, -1]])
    with pytest.raises(dynmoe.DynMoEError, match=str(vocab + 5)):
        mixtral.generate([1, vocab + 5], 2)
    with mixtral.session() as s:
        with pytest.raises(dynmoe.DynMoEError):
            s.eval([vocab])
        assert s.position == 0  # a failed call leaves the session unchanged
    assert mixtral.stats().tokens == 0


def test_top_k_larger_than_experts(mixtral):
    experts = mixtral.info.num_experts
    with pytest.raises(dynmoe.DynMoEError) as info:
        mixtral.forward([1, 2, 3], routing=dynmoe.TopK(experts + 1))
    assert info.value.status_name == "DYNMOE_ERR_INVALID_ARGUMENT"
    assert str(experts + 1) in info.value.message
    mixtral.forward([1, 2, 3], routing=dynmoe.TopK(experts))
    with pytest.raises(dynmoe.DynMoEError):
        mixtral.forward([1, 2, 3], routing=dynmoe.TopP(0.5, min_experts=experts + 1))
    with pytest.raises(dynmoe.DynMoEError):
        mixtral.session(routing=dynmoe.TopK(experts + 1))


@pytest.mark.parametrize("name,layer", [("qwen2moe-tiny", 1), ("dynamic-moe-tiny", 1), ("mixtral-tiny", 7),
                                        ("mixtral-tiny", -1)])
def test_routing_for_a_layer_without_experts(models, name, layer):
    model = models(name)
    with pytest.raises(dynmoe.DynMoEError) as info:
        model.forward([1, 2, 3], routing={layer: dynmoe.TopK(1)})
    assert f"layer {layer}" in info.value.message
    with model.session() as s:
        with pytest.raises(dynmoe.DynMoEError, match=f"layer {layer}"):
            s.set_routing({layer: dynmoe.TopK(1)})


@pytest.mark.parametrize("make", [
    lambda: dynmoe.TopK(0),
    lambda: dynmoe.TopK(-3),
    lambda: dynmoe.TopP(0.0),
    lambda: dynmoe.TopP(1.5),
    lambda: dynmoe.TopP(float("nan")),
    lambda: dynmoe.TopP(0.5, min_experts=0),
    lambda: dynmoe.TopP(0.5, min_experts=3, max_experts=2),
])
def test_invalid_policy_values(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("make", [
    lambda: dynmoe.TopK(1.5),
    lambda: dynmoe.TopK("2"),
    lambda: dynmoe.TopK(True),
    lambda: dynmoe.TopK(2, renormalize=1),
    lambda: dynmoe.TopP("0.5"),
    lambda: dynmoe.TopP(0.5, max_experts=2.0),
])
def test_invalid_policy_types(make):
    with pytest.raises(TypeError):
        make()


def test_policies_are_frozen_and_hashable():
    policy = dynmoe.TopP(0.5, max_experts=2)
    with pytest.raises(AttributeError):
        policy.p = 0.7
    assert {policy: 1}[dynmoe.TopP(0.5, max_experts=2)] == 1
    assert dynmoe.TopK(2) == dynmoe.TopK(2, renormalize=None)
    assert dynmoe.TopP(1) == dynmoe.TopP(1.0)  # p = 1 keeps every expert


@pytest.mark.parametrize("routing,error", [
    ("top_k", ValueError),
    ({"defualt": dynmoe.TopK(1)}, ValueError),
    ({0: "dense"}, ValueError),
    (3, TypeError),
    ({0.5: dynmoe.TopK(1)}, TypeError),
    ({0: 2}, TypeError),
    ([dynmoe.TopK(1)], TypeError),
])
def test_invalid_routing_arguments(mixtral, routing, error):
    with pytest.raises(error):
        mixtral.forward([1, 2, 3], routing=routing)
    with pytest.raises(error):
        mixtral.session(routing=routing)
    assert mixtral.stats().tokens == 0  # validated before anything ran


@pytest.mark.parametrize("ids,error", [
    ([1.0, 2.0], ValueError),
    (np.array([1.5, 2.5]), ValueError),
    (np.array([True, False]), ValueError),
    (np.zeros((1, 2, 3), dtype=np.int64), ValueError),
    (5, ValueError),
    ([], ValueError),
    ([[]], ValueError),
    (np.zeros((0, 4), dtype=np.int32), ValueError),
    ([[1, 2], [3]], ValueError),
    ([1, 2**31], ValueError),
    (np.array([-(2**40)]), ValueError),
    (None, TypeError),
    ("abc", TypeError),
    (["a", "b"], TypeError),
    ({1: 2}, TypeError),
])
def test_invalid_ids(mixtral, ids, error):
    with pytest.raises(error):
        mixtral.forward(ids)
    with pytest.raises(error):
        mixtral.generate(ids, 2)


@pytest.mark.parametrize("kwargs,error", [
    ({"max_new_tokens": -1}, ValueError),
    ({"max_new_tokens": 2.0}, TypeError),
    ({"temperature": -0.5}, ValueError),
    ({"temperature": "hot"}, TypeError),
    ({"temperature": float("inf")}, ValueError),
    ({"temperature": float("nan")}, ValueError),
    ({"top_k": -1}, ValueError),
    ({"top_p": 0.0}, ValueError),
    ({"top_p": 1.5}, ValueError),
    ({"seed": -1}, ValueError),
    ({"seed": 2**64}, ValueError),
    ({"stop_tokens": [1.5]}, TypeError),
    ({"stop_tokens": "2"}, TypeError),
])
def test_invalid_generation_arguments(mixtral, kwargs, error):
    args = {"max_new_tokens": 2, **kwargs}
    with mixtral.session() as s:
        with pytest.raises(error):
            s.generate([1, 2], **args)
        with pytest.raises(error):
            s.stream([1, 2], **args)
        assert s.position == 0


@pytest.mark.parametrize("kwargs,error", [
    ({"threads": 0}, ValueError),
    ({"threads": 1.5}, TypeError),
    ({"threads": "4"}, TypeError),
])
def test_invalid_model_arguments(kwargs, error):
    with pytest.raises(error):
        dynmoe.Model(reference("mixtral-tiny").model_dir, **kwargs)
    with pytest.raises(TypeError):
        dynmoe.Model(42)


@pytest.mark.parametrize("kwargs,error", [
    ({"n_sequences": 0}, ValueError),
    ({"n_sequences": "2"}, TypeError),
    ({"capacity": 0}, ValueError),
    ({"memory_budget": -5}, ValueError),
])
def test_invalid_session_arguments(mixtral, kwargs, error):
    with pytest.raises(error):
        mixtral.session(**kwargs)


def test_temperature_must_be_finite_and_says_so(mixtral):
    with mixtral.session() as s:
        with pytest.raises(ValueError, match=r"temperature must be finite and >= 0\.0, got inf"):
            s.generate([1, 2], 2, temperature=float("inf"))


def test_session_capacity_beyond_the_trained_range(mixtral):
    limit = mixtral.info.max_position_embeddings
    with mixtral.session(capacity=limit) as s:
        assert s.capacity == limit
    with pytest.raises(dynmoe.DynMoEError) as info:
        mixtral.session(capacity=limit + 1)
    assert info.value.status_name == "DYNMOE_ERR_INVALID_ARGUMENT"
    assert "max_position_embeddings" in info.value.message and str(limit + 1) in info.value.message


def test_model_generate_past_the_trained_range_is_context_full(mixtral):
    limit = mixtral.info.max_position_embeddings
    # The prompt plus all new tokens but the last (which is never evaluated) must fit.
    assert mixtral.generate([1, 2, 3, 4], limit - 3).shape == (1, limit - 3)
    with pytest.raises(dynmoe.DynMoEError) as info:
        mixtral.generate([1, 2, 3, 4], limit - 2)
    assert info.value.status_name == "DYNMOE_ERR_CONTEXT_FULL"
    assert f"need {limit + 1} positions" in info.value.message


def test_session_batch_mismatch(mixtral):
    with mixtral.session(n_sequences=2) as s:
        with pytest.raises(ValueError, match="has 1 sequence, the session has 2"):
            s.eval([[1, 2]])
        with pytest.raises(ValueError, match="sequences"):
            s.generate([[1, 2], [3, 4], [5, 6]], 2)
        with pytest.raises(ValueError):
            s.rewind(-1)


def test_closed_model():
    path = reference("mixtral-tiny").model_dir
    with dynmoe.Model(path, threads=1) as model:
        assert not model.closed
        assert model.forward([1, 2]).logits.shape == (1, 2, 80)
    assert model.closed
    model.close()  # idempotent
    for call in (lambda: model.forward([1, 2]), model.stats, model.reset_stats,
                 lambda: model.generate([1], 1), model.session):
        with pytest.raises(ValueError, match="model is closed"):
            call()
    with pytest.raises(ValueError, match="model is closed"):
        with model:
            pass
    assert model.info.vocab_size == 80  # static information stays readable
    assert "closed" in repr(model)


def test_error_attributes_and_pickling():
    import pickle

    error = dynmoe.DynMoEError(7, "context full")
    assert error.status_name == "DYNMOE_ERR_CONTEXT_FULL"
    assert str(error) == "DYNMOE_ERR_CONTEXT_FULL: context full"
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.status, clone.status_name, clone.message) == (7, "DYNMOE_ERR_CONTEXT_FULL", "context full")
    assert dynmoe.DynMoEError(99, "x").status_name == "DYNMOE_ERR_UNKNOWN"


def test_load_options_and_progress():
    path = reference("olmoe-tiny").model_dir
    progress = []
    with dynmoe.Model(path, threads=1, prefetch=True, progress=progress.append) as model:
        assert model.forward([1, 2]).logits.shape == (1, 2, model.info.vocab_size)
    assert progress and progress[-1] == 1.0
    assert all(0.0 <= value <= 1.0 for value in progress) and progress == sorted(progress)

    def fail(_fraction):
        raise KeyError("stop loading")

    with pytest.raises(KeyError, match="stop loading"):
        dynmoe.Model(path, progress=fail)
