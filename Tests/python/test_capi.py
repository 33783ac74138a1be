"""The raw ctypes layer mirrors include/dynmoe.h exactly."""

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import dynmoe
from dynmoe import _capi
from conftest import REPO

HEADER = (REPO / "include" / "dynmoe.h").read_text()

STRUCTS = {
    "dynmoe_load_params": _capi.dynmoe_load_params,
    "dynmoe_model_info": _capi.dynmoe_model_info,
    "dynmoe_policy": _capi.dynmoe_policy,
    "dynmoe_routing_event": _capi.dynmoe_routing_event,
    "dynmoe_forward_params": _capi.dynmoe_forward_params,
    "dynmoe_stats_summary": _capi.dynmoe_stats_summary,
    "dynmoe_layer_stats": _capi.dynmoe_layer_stats,
    "dynmoe_session_params": _capi.dynmoe_session_params,
    "dynmoe_sampling_params": _capi.dynmoe_sampling_params,
}


def header_functions():
    return set(re.findall(r"^[A-Za-z_][\w ]*?\*?\s*(dynmoe_\w+)\(", HEADER, flags=re.MULTILINE))


def test_every_header_function_is_declared():
    functions = header_functions()
    assert len(functions) > 40
    assert functions == set(_capi.PROTOTYPES)
    lib = _capi.lib()
    for name in functions:
        assert getattr(lib, name).argtypes is not None, name


def test_argument_counts_match_header():
    for name, (_restype, argtypes) in _capi.PROTOTYPES.items():
        match = re.search(rf"^(?!\s*[/*])[^\n]*?\b{name}\(([^;]*?)\);", HEADER, flags=re.MULTILINE)
        assert match, name
        params = match.group(1).strip()
        count = 0 if params in ("", "void") else params.count(",") + 1
        assert count == len(argtypes), name


def test_constants_match_header():
    defines = dict(re.findall(r"#define (DYNMOE_\w+) \(?(-?\d+)\)?", HEADER))
    enums = dict(re.findall(r"^\s+(DYNMOE_\w+) = (\d+),?", HEADER, flags=re.MULTILINE))
    constants = {**defines, **enums}
    assert len(constants) > 20
    for name, value in constants.items():
        assert getattr(_capi, name) == int(value), name
    for name, value in enums.items():
        if name.startswith("DYNMOE_ERR_") or name == "DYNMOE_OK":
            assert _capi.STATUS_NAMES[int(value)] == name
            assert _capi.lib().dynmoe_status_name(int(value)).decode() == name


def test_version():
    version = dynmoe.library_version()
    assert version == f"{_capi.DYNMOE_VERSION_MAJOR}.{_capi.DYNMOE_VERSION_MINOR}.{_capi.DYNMOE_VERSION_PATCH}"
    assert version == dynmoe.__version__
    # The package metadata carries the same version (it once lagged behind by a patch release).
    pyproject = (REPO / "bindings" / "python" / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == version
    assert _capi.compatible_version(version)


def test_system_info_names_the_kernels_this_machine_runs():
    info = dynmoe.system_info()
    assert info["version"] == dynmoe.library_version()
    assert info["cpus"] == str(os.cpu_count())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    assert "sse2" in flags
    avx512 = "avx512f" in flags and "avx512bw" in flags and os.environ.get("DYNMOE_MAX_ISA") != "avx2"
    build = info["build"].split(",")
    if "avx2" not in build:
        assert info["prefill"] == "swift"
    else:
        assert info["prefill"] == ("avx512" if avx512 else "avx2")
    if "avx2" in build and "fma" in build:
        assert info["decode"] == ("avx512" if avx512 else "avx2")
    else:
        assert info["decode"] == "simd8"


def test_capping_the_kernels_at_avx2_still_matches_the_references():
    """DYNMOE_MAX_ISA=avx2 keeps the AVX-512 kernels off (system_info says so) and the reference
    fixtures still match: on an AVX-512 machine the only native run of the AVX2 kernels' path."""
    env = dict(os.environ, DYNMOE_MAX_ISA="avx2",
               PYTHONPATH=os.pathsep.join([str(REPO / "bindings" / "python"), os.environ.get("PYTHONPATH", "")]))
    probe = subprocess.run([sys.executable, "-c", "import dynmoe, json; print(json.dumps(dynmoe.system_info()))"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout)
    build = info["build"].split(",")
    if "avx2" in build and "fma" in build:
        assert (info["prefill"], info["decode"]) == ("avx2", "avx2")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(REPO / "Tests" / "python" / "test_reference.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", run.stdout)


def test_only_a_library_with_the_same_struct_layouts_is_accepted():
    major, minor = _capi.DYNMOE_VERSION_MAJOR, _capi.DYNMOE_VERSION_MINOR
    assert _capi.compatible_version(f"{major}.{minor}.7")
    assert not _capi.compatible_version(f"{major + 1}.{minor}.0")
    assert not _capi.compatible_version("garbage")
    # before 1.0 a minor release may change struct layouts
    assert _capi.compatible_version(f"{major}.{minor + 1}.0") == (major != 0)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_struct_layouts_match_the_c_compiler(tmp_path):
    """sizeof and offsetof of every struct and field, as the C compiler lays them out."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "dynmoe.h"', "int main(void) {"]
    for name, struct in STRUCTS.items():
        lines.append(f'printf("{name} %zu %zu\\n", sizeof({name}), _Alignof({name}));')
        for field, _type in struct._fields_:
            lines.append(f'printf("{name}.{field} %zu %zu\\n", offsetof({name}, {field}), '
                         f"sizeof((({name} *)0)->{field}));")
    lines += ["return 0;", "}"]
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    binary = tmp_path / "layout"
    subprocess.run(["cc", "-std=c11", "-I", str(REPO / "include"), str(source), "-o", str(binary)], check=True)
    c_layout = dict(line.split(" ", 1) for line in subprocess.run([str(binary)], check=True, capture_output=True,
                                                                   text=True).stdout.splitlines())
    for name, struct in STRUCTS.items():
        assert c_layout[name] == f"{ctypes.sizeof(struct)} {ctypes.alignment(struct)}", name
        for field, ctype in struct._fields_:
            offset = getattr(struct, field).offset
            assert c_layout[f"{name}.{field}"] == f"{offset} {ctypes.sizeof(ctype)}", f"{name}.{field}"


def test_defaults_from_the_library():
    lib = _capi.lib()
    load = lib.dynmoe_load_params_default()
    assert load.n_threads == 0 and load.prefetch == 0 and not load.progress_callback
    forward = lib.dynmoe_forward_params_default()
    assert not forward.routing and forward.record_trace == 0
    assert forward.logits_mode == _capi.DYNMOE_LOGITS_DEFAULT and not forward.observer
    session = lib.dynmoe_session_params_default()
    assert session.n_sequences == 1 and session.capacity == 0 and session.memory_budget_bytes == 0
    sampling = lib.dynmoe_sampling_params_default()
    assert sampling.temperature == 0 and sampling.top_k == 0 and sampling.top_p == 1.0
    native = lib.dynmoe_policy_native()
    assert native.mode == _capi.DYNMOE_ROUTING_NATIVE
    top_k = lib.dynmoe_policy_top_k(3)
    assert (top_k.mode, top_k.k, top_k.renormalize) == (_capi.DYNMOE_ROUTING_TOP_K, 3, _capi.DYNMOE_RENORMALIZE_NATIVE)
    top_p = lib.dynmoe_policy_top_p(0.25)
    assert (top_p.mode, top_p.threshold, top_p.min_experts, top_p.max_experts) == (_capi.DYNMOE_ROUTING_TOP_P, 0.25, 0, 0)
    assert dynmoe.TopK(3)._to_c().renormalize == top_k.renormalize
    assert bytes(dynmoe.TopP(0.25)._to_c()) == bytes(top_p)


def test_raw_observer_and_token_experts(models):
    """The observer callback and dynmoe_trace_get_token_experts, which the Pythonic layer does not wrap."""
    model = models("mixtral-tiny")
    lib = _capi.lib()
    events = []

    def observe(event_ptr, _user_data):
        event = event_ptr.contents
        counts = [event.counts[i] for i in range(event.num_tokens)]
        events.append((event.layer, event.num_tokens, event.num_experts, counts))

    observer = _capi.dynmoe_routing_observer(observe)
    params = lib.dynmoe_forward_params_default()
    params.observer = observer
    params.record_trace = 1
    tokens = (ctypes.c_int32 * 3)(1, 2, 3)
    trace = _capi.dynmoe_trace_p()
    status = lib.dynmoe_forward(model._handle, tokens, 1, 3, params, None, 0, trace)
    assert status == 0, lib.dynmoe_last_error()
    try:
        assert [(layer, n, e) for layer, n, e, _ in events] == [(0, 3, 8), (1, 3, 8)]
        assert all(counts == [2, 2, 2] for *_, counts in events)
        experts = (ctypes.c_int32 * 8)()
        weights = (ctypes.c_float * 8)()
        count = ctypes.c_size_t()
        assert lib.dynmoe_trace_get_token_experts(trace, 0, 0, 1, experts, weights, 8, count) == 0
        assert count.value == 2 and weights[0] >= weights[1] > 0
        assert abs(weights[0] + weights[1] - 1) < 1e-5  # Mixtral renormalises
        # Too small a buffer writes nothing and says so.
        assert lib.dynmoe_trace_get_token_experts(trace, 0, 0, 1, experts, weights, 1, count) == \
            _capi.DYNMOE_ERR_BUFFER_TOO_SMALL
        small = (ctypes.c_float * 4)()
        assert lib.dynmoe_trace_get_hidden(trace, 0, small, 4) == _capi.DYNMOE_ERR_BUFFER_TOO_SMALL
    finally:
        lib.dynmoe_trace_free(trace)


def test_library_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv(_capi.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(OSError, match="DYNMOE_LIBRARY"):
        _capi.find_library()
    monkeypatch.delenv(_capi.LIBRARY_ENV)
    found = _capi.find_library()
    assert found.name == "libdynmoe.so" and found.is_file()
    if os.environ.get(_capi.LIBRARY_ENV) is None and found.parent.name == "lib":
        assert found == REPO / "build" / "lib" / "libdynmoe.so"


# --------------------------------------------------------------------------------------------
# The Pythonic layer's handle ownership and argument checks (issues from a user review)
# --------------------------------------------------------------------------------------------

import copy  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import pickle  # noqa: E402
import tracemalloc  # noqa: E402
import weakref  # noqa: E402

import numpy as np  # noqa: E402

from conftest import reference  # noqa: E402


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
