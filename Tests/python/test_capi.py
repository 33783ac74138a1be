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

