"""The Pythonic layer's own guarantees: who owns library handles (release, copy, pickle), the
shape of the generation methods, and the checks it makes before calling the library (token ids
beyond int32, values that round to invalid float32, outputs too large for the context)."""

import copy
import ctypes
import gc
import inspect
import pickle
import tracemalloc
import weakref

import numpy as np
import pytest

import dynmoe
from dynmoe import _capi
from conftest import reference


def _fresh_model(name="mixtral-tiny"):
    return dynmoe.Model(reference(name).model_dir, threads=1)


def test_a_closed_model_is_released_with_its_last_collected_session():
    model = _fresh_model()
    first, second = model.session(), model.session()
    model.close()
    assert model._finalizer.alive
    first_ref = weakref.ref(first)
    first = None  # dropped, not closed: nothing else may keep it alive (no gc.collect needed)
    assert first_ref() is None
    assert model._finalizer.alive  # the second session still uses the model
    assert second.eval([1, 2]).shape == (1, 80)
    second = None
    gc.collect()
    assert not model._finalizer.alive
    # An open model stays loaded when its sessions go, and a session in a reference cycle releases
    # a closed model when the cycle is collected.
    model = _fresh_model()
    model.session().eval([1])
    gc.collect()
    assert model._finalizer.alive and model.forward([1]).logits.shape == (1, 1, 80)
    session = model.session()
    session.cycle = session
    model.close()
    session = None
    gc.collect()
    assert not model._finalizer.alive


def test_session_generate_and_stream_take_routing_third_like_model_generate(mixtral):
    ids = [[5, 9, 13]]
    expected = mixtral.generate(ids, 3, routing=dynmoe.TopK(1))
    assert not np.array_equal(expected, mixtral.generate(ids, 3))  # the routing matters here
    np.testing.assert_array_equal(mixtral.generate(ids, 3, dynmoe.TopK(1)), expected)
    with mixtral.session() as s:
        np.testing.assert_array_equal(s.generate(ids, 3, dynmoe.TopK(1)), expected)
        s.rewind(0)
        np.testing.assert_array_equal(np.stack(list(s.stream(ids, 3, dynmoe.TopK(1))), axis=1), expected)
        s.rewind(0)
        with pytest.raises(TypeError):
            s.generate(ids, 3, None, 0.5)  # the sampling options are keyword-only
        with pytest.raises(TypeError):
            s.stream(ids, 3, None, 0.5)
    model_params = inspect.signature(dynmoe.Model.generate).parameters
    for method in (dynmoe.Session.generate, dynmoe.Session.stream):
        params = inspect.signature(method).parameters
        assert list(params)[:4] == ["self", "prompt_ids", "max_new_tokens", "routing"]
        for name in ("temperature", "top_k", "top_p", "seed", "stop_tokens"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert params[name].default == model_params[name].default, name


@pytest.mark.parametrize("ids,bad", [
    ([1, 2**63], 2**63),
    ([1, 2**70], 2**70),
    ([[1, 2], [3, -(2**70)]], -(2**70)),
    ([1, 2**31], 2**31),
    (np.array([1, 2**63], dtype=np.uint64), 2**63),
    (np.array([7, -(2**40)]), -(2**40)),
    (np.array([1, 2**40], dtype=object), 2**40),
])
def test_token_ids_outside_int32_are_a_value_error_naming_the_id(mixtral, ids, bad):
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the int32 range"):
        mixtral.forward(ids)
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the int32 range"):
        mixtral.generate(ids, 2)
    with mixtral.session(n_sequences=len(ids) if np.ndim(ids) == 2 else 1) as s:
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the int32 range"):
            s.eval(ids)


def test_token_ids_may_be_python_ints_in_any_container_but_not_an_iterator(mixtral):
    expected = mixtral.forward([[1, 2, 3]]).logits
    for ids in ([1, 2, 3], (1, 2, 3), np.array([1, 2, 3], dtype=object), np.array([[1, 2, 3]], dtype=object),
                [np.int64(1), 2, np.uint8(3)], np.array([1, 2, 3], dtype=np.uint64)):
        np.testing.assert_array_equal(mixtral.forward(ids).logits, expected)
    for ids in ((i for i in (1, 2, 3)), iter([1, 2, 3]), map(int, "123")):
        with pytest.raises(TypeError, match=r"sequence or numpy array.*list\(\)"):
            mixtral.forward(ids)
    for ids, error in (([1, 2.5], ValueError), (np.array([1, 2.0], dtype=object), ValueError),
                       (np.array([1, True], dtype=object), ValueError), (np.array([1, "a"], dtype=object), TypeError),
                       (np.array([1, None], dtype=object), TypeError)):
        with pytest.raises(error, match="integer token ids"):
            mixtral.forward(ids)


def test_values_that_round_to_an_invalid_float32_are_a_value_error(mixtral):
    with pytest.raises(ValueError, match="float32"):
        dynmoe.TopP(1e-50)
    assert dynmoe.TopP(1e-45).p == 1e-45  # the smallest float32 above 0 is a valid threshold
    with mixtral.session() as s:
        for kwargs in ({"top_p": 1e-50}, {"temperature": 1e-50}, {"temperature": 1e-40}, {"temperature": 1e39}):
            with pytest.raises(ValueError, match="float32"):
                s.generate([1, 2], 2, **kwargs)
            with pytest.raises(ValueError, match="float32"):
                s.stream([1, 2], 2, **kwargs)
            with pytest.raises(ValueError, match="float32"):
                mixtral.generate([1, 2], 2, **kwargs)
        assert s.position == 0
        assert s.generate([1, 2], 2, temperature=1e-30, top_p=1e-45, seed=1).shape == (1, 2)


def _raw_generate_error(session, prompt, max_new_tokens):
    """The library's own DYNMOE_ERR_CONTEXT_FULL message (max_new_tokens small enough to allocate)."""
    lib = _capi.lib()
    tokens = (ctypes.c_int32 * len(prompt))(*prompt)
    out = (ctypes.c_int32 * max_new_tokens)()
    status = lib.dynmoe_session_generate(session._handle, tokens, len(prompt), max_new_tokens,
                                         lib.dynmoe_sampling_params_default(), None, 0, None,
                                         _capi.dynmoe_token_callback(), None, out, max_new_tokens, None)
    assert status == _capi.DYNMOE_ERR_CONTEXT_FULL
    message = lib.dynmoe_last_error().decode()
    lib.dynmoe_clear_error()
    return message


def test_a_huge_max_new_tokens_is_context_full_before_anything_is_allocated(mixtral):
    limit = mixtral.info.max_position_embeddings
    with mixtral.session(capacity=16) as s:
        s.eval([1, 2])
        library = _raw_generate_error(s, [3, 4, 5], 300)
        with pytest.raises(dynmoe.DynMoEError) as info:
            s.generate([3, 4, 5], 300)
        assert info.value.status_name == "DYNMOE_ERR_CONTEXT_FULL" and info.value.message == library
        assert "2 cached + 3 prompt + 300 new tokens need 304 positions" in library
    tracemalloc.start()
    try:
        for call in (lambda: mixtral.generate([1, 2, 3], 2**31 - 1),
                     lambda: mixtral.session(n_sequences=4, capacity=8).generate(np.ones((4, 3), int), 2**31 - 1),
                     lambda: next(mixtral.session(capacity=8).stream([1, 2, 3], 2**31 - 1))):
            with pytest.raises(dynmoe.DynMoEError) as info:
                call()
            assert info.value.status_name == "DYNMOE_ERR_CONTEXT_FULL"
            assert f"new tokens need {2**31 + 1} positions" in info.value.message
        assert "capacity of 8" in info.value.message
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**24, f"{peak} bytes allocated"
    with pytest.raises(dynmoe.DynMoEError, match=f"more than the capacity of {limit}"):
        mixtral.generate([1, 2, 3], 10**8)


def test_handle_owners_cannot_be_copied_or_pickled():
    model = _fresh_model()
    session = model.session()
    for obj, name in ((model, "Model"), (session, "Session")):
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=rf"dynmoe\.{name} cannot be copied or pickled"):
                attempt(obj)
    session.close()
    model.close()
    assert not model._finalizer.alive


def test_native_top_p_reads_as_the_shortest_float32_decimal(models):
    info = models("dynamic-moe-tiny").info
    raw = _capi.dynmoe_model_info()
    assert _capi.lib().dynmoe_model_get_info(models("dynamic-moe-tiny")._handle, raw) == 0
    assert info.native_top_p == 0.4 and np.float32(info.native_top_p) == np.float32(raw.native_top_p)
    assert repr(info.native_policy) == "TopP(p=0.4, min_experts=None, max_experts=None, renormalize=False)"
    assert info.native_policy._to_c().threshold == raw.native_top_p
    assert models("mixtral-tiny").info.native_top_p == 0.0
