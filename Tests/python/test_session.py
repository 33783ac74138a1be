"""Incremental decoding through dynmoe.Session against the reference fixtures."""

import gc
import threading

import numpy as np
import pytest

import dynmoe
from conftest import assert_logits_close, assert_stats_match, policy_from_reference, reference


def test_session_greedy_matches_reference(models, greedy_run):
    name, run_name = greedy_run
    ref = reference(name)
    run = ref.runs[run_name]
    routing = policy_from_reference(run["routing"])
    expected = ref.tensor(run_name, "greedy")
    batch, length = ref.input_ids.shape
    steps = run["greedy_steps"]
    with models(name).session(n_sequences=batch, capacity=length + steps, routing=routing) as session:
        np.testing.assert_array_equal(session.generate(ref.input_ids, steps), expected)
        session.rewind(0)
        streamed = list(session.stream(ref.input_ids, steps))
        assert all(step.shape == (batch,) and step.dtype == np.int64 for step in streamed)
        np.testing.assert_array_equal(np.stack(streamed, axis=1), expected)


def test_prefill_then_decode_matches_forward(models, fixture_run):
    """Prefill half of the tokens, decode the rest one by one: logits equal the full forward's."""
    name, run_name = fixture_run
    ref = reference(name)
    run = ref.runs[run_name]
    expected = ref.tensor(run_name, "logits")
    tolerance = ref.meta["tolerance"]
    ids = ref.input_ids
    batch, length = ids.shape
    half = length // 2
    with models(name).session(n_sequences=batch, capacity=length, routing=policy_from_reference(run["routing"])) as s:
        assert s.capacity == length and s.position == 0
        prefill = s.eval(ids[:, :half], all_logits=True)
        assert prefill.shape == (batch, half, expected.shape[-1])
        assert_logits_close(prefill, expected[:, :half], tolerance, "prefill logits")
        decoded = []
        for t in range(half, length):
            logits = s.eval(ids[:, t : t + 1])
            assert logits.shape == (batch, expected.shape[-1])
            assert_logits_close(logits, expected[:, t], tolerance, f"decode logits at {t}")
            decoded.append(logits)
        assert s.position == length
        assert_stats_match(s.stats(), run["stats"], "session stats")

        # Rewinding and decoding again reproduces the same logits.
        s.rewind(half)
        assert s.position == half
        for t, previous in zip(range(half, length), decoded):
            np.testing.assert_allclose(s.eval(ids[:, t : t + 1]), previous, rtol=0, atol=1e-5)


def test_eval_with_routing_override_and_trace(models):
    ref = reference("mixtral-tiny")
    ids = ref.input_ids
    with models("mixtral-tiny").session(n_sequences=2, routing=dynmoe.TopK(1)) as s:
        out = s.eval(ids, routing="native", all_logits=True, trace=True)
        assert isinstance(out, dynmoe.ForwardOutput)
        assert_logits_close(out.logits, ref.tensor("native", "logits"))
        np.testing.assert_array_equal(out.trace[0].selected, ref.tensor("native", "selected", 0).astype(bool))
        assert out.stats.tokens == ids.size
        assert len(out.hidden) == 2
        # The session default (top-1) applies again to the next call.
        s.rewind(0)
        assert_logits_close(s.eval(ids, all_logits=True), ref.tensor("top_k_1", "logits"))
        s.set_routing(dynmoe.TopP(0.5))
        s.rewind(0)
        assert_logits_close(s.eval(ids, all_logits=True), ref.tensor("top_p_0.5", "logits"))
        s.set_routing(None)
        s.rewind(0)
        last = s.eval(ids)
        assert_logits_close(last, ref.tensor("native", "logits")[:, -1])


def test_one_dimensional_ids_in_single_sequence_session(models):
    ref = reference("olmoe-tiny")
    with models("olmoe-tiny").session() as s:
        logits = s.eval(ref.input_ids[0])
        assert logits.shape == (1, ref.tensor("native", "logits").shape[-1])
        assert_logits_close(logits[0], ref.tensor("native", "logits")[0, -1])
    with models("olmoe-tiny").session(n_sequences=2) as s:
        with pytest.raises(ValueError, match="has 1 sequence, the session has 2"):
            s.eval(ref.input_ids[0])


def test_generate_continues_from_cache(models):
    """generate() with an empty prompt continues where the cache is."""
    ref = reference("qwen3moe-tiny-bf16")
    expected = ref.tensor("native", "greedy")
    with models("qwen3moe-tiny-bf16").session(n_sequences=2) as s:
        first = s.generate(ref.input_ids, 2)
        rest = s.generate(np.zeros((2, 0), dtype=np.int64), expected.shape[1] - 2)
        np.testing.assert_array_equal(np.concatenate([first, rest], axis=1), expected)
        s.rewind(0)
        first = s.generate(ref.input_ids, 3)
        rest = s.generate([], expected.shape[1] - 3)
        np.testing.assert_array_equal(np.concatenate([first, rest], axis=1), expected)


def test_sampling_is_reproducible(models, fixture_name):
    ref = reference(fixture_name)
    ids = ref.input_ids
    with models(fixture_name).session(n_sequences=ids.shape[0], capacity=ids.shape[1] + 8) as s:
        def sample(seed, stream=False):
            s.rewind(0)
            if stream:
                return np.stack(list(s.stream(ids, 8, temperature=1.0, seed=seed)), axis=1)
            return s.generate(ids, 8, temperature=1.0, seed=seed)

        first = sample(1234)
        np.testing.assert_array_equal(sample(1234), first)
        np.testing.assert_array_equal(sample(1234, stream=True), first)
        outcomes = {sample(seed).tobytes() for seed in range(6)}
        assert len(outcomes) >= 2, "different seeds at temperature 1.0 gave identical samples"
        # top_k = 1 is greedy whatever the temperature and seed.
        s.rewind(0)
        top1 = s.generate(ids, 4, temperature=1.0, top_k=1, seed=99)
        s.rewind(0)
        np.testing.assert_array_equal(top1, s.generate(ids, 4))


def test_stop_tokens(models):
    ref = reference("mixtral-tiny")
    expected = ref.tensor("native", "greedy")  # [[71 55 47 60 60 60], [23 29 73 23 29 14]]
    stop = {int(expected[0, 1]), int(expected[1, 2])}
    with models("mixtral-tiny").session(n_sequences=2) as s:
        out = s.generate(ref.input_ids, 6, stop_tokens=stop)
    # Both sequences have stopped after step 3; a stopped sequence repeats its stop token.
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out[1], expected[1, :3])
    np.testing.assert_array_equal(out[0], [expected[0, 0], expected[0, 1], expected[0, 1]])


def test_stream_is_lazy_and_can_stop_early(models):
    ref = reference("mixtral-tiny")
    expected = ref.tensor("native", "greedy")
    batch, length = ref.input_ids.shape
    with models("mixtral-tiny").session(n_sequences=batch) as s:
        stream = s.stream(ref.input_ids, 6)
        assert s.position == 0  # nothing runs before the first item is requested
        for step, tokens in enumerate(stream):
            np.testing.assert_array_equal(tokens, expected[:, step])
            if step == 1:
                break
        stream.close()
        # The session is usable again and holds the prompt plus the evaluated generated tokens.
        assert length + 1 <= s.position <= length + 2
        s.rewind(length - 1)
        np.testing.assert_array_equal(s.generate(ref.input_ids[:, -1:], 1), expected[:, :1])


def test_stream_validates_eagerly_and_reports_errors(models):
    with models("mixtral-tiny").session() as s:
        with pytest.raises(ValueError):
            s.stream([1, 2], -1)
        with pytest.raises(TypeError):
            s.stream([1, 2], 3, stop_tokens="ab")
        with pytest.raises(dynmoe.DynMoEError, match="vocabulary"):
            list(s.stream([1, 10_000], 3))


def test_context_full(models):
    with models("mixtral-tiny").session(capacity=4) as s:
        assert s.capacity == 4
        with pytest.raises(dynmoe.DynMoEError) as info:
            s.eval([1, 2, 3, 4, 5])
        assert info.value.status_name == "DYNMOE_ERR_CONTEXT_FULL"
        s.eval([1, 2, 3, 4])
        with pytest.raises(dynmoe.DynMoEError):
            s.eval([1])
        s.rewind(2)
        s.eval([3, 4])
        with pytest.raises(dynmoe.DynMoEError):
            s.rewind(5)


def test_memory_budget_caps_capacity(models):
    model = models("mixtral-tiny")
    with model.session() as s:
        assert s.capacity == model.info.max_position_embeddings
    with model.session(memory_budget=1 << 40) as s:
        assert s.capacity == model.info.max_position_embeddings
    with model.session(capacity=8, memory_budget=1 << 40) as s:
        assert s.capacity == 8
    with model.session(memory_budget=4096) as small, model.session(memory_budget=8192) as large:
        assert 1 <= small.capacity < model.info.max_position_embeddings
        assert large.capacity in (2 * small.capacity, 2 * small.capacity + 1)
    with pytest.raises(dynmoe.DynMoEError):
        model.session(memory_budget=1)


@pytest.mark.parametrize("kv_dtype, unit_roundoff", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_kv_cache(models, fixture_name, kv_dtype, unit_roundoff):
    """A float16/bfloat16 KV cache: logits within 10 units of roundoff (relative L2) of the
    reference, prefill and decode; twice the positions of a float32 cache under a budget."""
    ref = reference(fixture_name)
    run_name = next(iter(ref.runs))
    expected = ref.tensor(run_name, "logits")
    ids = ref.input_ids
    batch, length = ids.shape
    model = models(fixture_name)
    with model.session(n_sequences=batch, capacity=length, kv_dtype=kv_dtype) as s:
        assert s.kv_dtype == kv_dtype and f"kv_dtype={kv_dtype}" in repr(s)
        half = length // 2
        first = s.eval(ids[:, :half], all_logits=True)
        rest = [s.eval(ids[:, t:t + 1]) for t in range(half, length)]
        logits = np.concatenate([first] + [step[:, None, :] for step in rest], axis=1)
    error = np.linalg.norm(logits - expected) / np.linalg.norm(expected)
    assert error <= 10 * unit_roundoff, f"relative L2 {error}"
    with model.session(memory_budget=16384) as f32, model.session(memory_budget=16384, kv_dtype=kv_dtype) as half:
        limit = model.info.max_position_embeddings
        assert half.capacity in (min(2 * f32.capacity, limit), min(2 * f32.capacity + 1, limit))


def test_model_generate_with_a_half_precision_cache(models, greedy_run):
    name, run_name = greedy_run
    ref = reference(name)
    run = ref.runs[run_name]
    tokens = models(name).generate(ref.input_ids, run["greedy_steps"], routing=policy_from_reference(run["routing"]),
                                   kv_dtype="float16")
    np.testing.assert_array_equal(tokens, ref.tensor(run_name, "greedy"))


def test_kv_dtype_is_checked(models):
    model = models("mixtral-tiny")
    with pytest.raises(ValueError, match="kv_dtype"):
        model.session(kv_dtype="int8")
    with pytest.raises(ValueError, match="kv_dtype"):
        dynmoe.Session(model, kv_dtype="f16")


def test_session_stats(models):
    model = models("qwen2moe-tiny")
    ref = reference("qwen2moe-tiny")
    model.reset_stats()
    with model.session(n_sequences=2) as s:
        s.eval(ref.input_ids)
        stats = s.stats()
        assert_stats_match(stats, ref.runs["native"]["stats"], "session stats")
        assert model.stats().tokens == ref.input_ids.size  # calls also count towards the model
        s.reset_stats()
        assert s.stats().tokens == 0
        assert model.stats().tokens == ref.input_ids.size


def test_session_timing(models):
    """Where a session's time went: one pass per call, parts adding up to the total, experts
    costing less with fewer of them, zeroed by reset_stats."""
    model = models("qwen3moe-tiny-bf16")
    with model.session() as s:
        assert s.timing() == dynmoe.Timing(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        s.eval([1, 2, 3, 4])
        for token in (5, 6):
            s.eval([token])
        t = s.timing()
        assert (t.passes, t.tokens) == (3, 6)
        parts = t.attention_seconds + t.moe_seconds + t.dense_seconds + t.head_seconds + t.other_seconds
        assert t.moe_seconds > 0 and t.attention_seconds > 0 and t.head_seconds > 0 and t.dense_seconds == 0
        assert abs(parts - t.total_seconds) <= 1e-9 * t.total_seconds
        with pytest.raises(dynmoe.DynMoEError):
            s.eval([10**6])  # out of the vocabulary: refused, not timed
        assert s.timing() == t
        s.reset_stats()
        assert s.timing().passes == 0 and s.timing().total_seconds == 0


def test_session_lifetime(models):
    path = reference("mixtral-tiny").model_dir
    # A session keeps its model alive.
    session = dynmoe.Model(path).session()
    gc.collect()
    assert session.eval([1, 2, 3]).shape == (1, 80)
    # Closing the model leaves open sessions working; the model itself refuses further use.
    model = dynmoe.Model(path)
    with model.session() as s:
        model.close()
        assert model.closed and not s.closed
        assert s.eval([1, 2, 3]).shape == (1, 80)
        s.set_routing(dynmoe.TopK(1))
        assert s.eval([4]).shape == (1, 80)
        with pytest.raises(ValueError, match="model is closed"):
            model.session()
    assert s.closed
    with pytest.raises(ValueError, match="session is closed"):
        s.eval([1])
    with pytest.raises(ValueError, match="session is closed"):
        _ = s.position
    s.close()
    session.close()
    session.close()


def test_sessions_on_threads(models):
    """Several sessions of one model may decode at once on different threads."""
    ref = reference("mixtral-tiny")
    expected = ref.tensor("native", "greedy")
    model = models("mixtral-tiny")
    results = [None] * 4

    def work(i):
        with model.session(n_sequences=2) as s:
            results[i] = s.generate(ref.input_ids, expected.shape[1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        np.testing.assert_array_equal(result, expected)


def test_session_is_busy_while_streaming(models):
    ref = reference("mixtral-tiny")
    expected = ref.tensor("native", "greedy")
    with models("mixtral-tiny").session(n_sequences=2) as s:
        stream = s.stream(ref.input_ids, 4)
        np.testing.assert_array_equal(next(stream), expected[:, 0])
        with pytest.raises(dynmoe.DynMoEError) as info:
            s.eval(ref.input_ids[:, :1])
        assert info.value.status_name == "DYNMOE_ERR_BUSY"
        np.testing.assert_array_equal(np.stack([expected[:, 0], *stream], axis=1), expected[:, :4])
        s.eval(ref.input_ids[:, :1])  # free again once the stream is exhausted


def test_closing_a_session_stops_its_stream(models):
    ref = reference("mixtral-tiny")
    s = models("mixtral-tiny").session(n_sequences=2)
    stream = s.stream(ref.input_ids, 50)
    next(stream)
    s.close()  # waits for the generating thread before releasing the cache
    assert s.closed
    assert list(stream) == []
