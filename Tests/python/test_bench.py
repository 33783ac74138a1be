"""The benchmark scripts (bench/run.py with bench/bench.c and bench/bandwidth.c) in --quick mode.

A smoke test that the benchmark still builds, runs and writes consistent figures; the speeds
themselves are never asserted (they belong to benchmarks, not tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO


def check_passes_judged(d, readings_key, pct_key, row_gbps_key):
    """Each decode pass of a two-pass row is judged against the better of the bandwidth readings
    next to it (one before the first pass, one after each, so neighbours share one); the row
    reports the medians."""
    passes = d["passes"]
    assert passes[0][readings_key][1] == passes[1][readings_key][0]
    for x in passes:
        gbps = max(x[readings_key])
        assert min(x[readings_key]) > 0
        expected = 100 * x["tok_s"] * d["bytes_per_token"] / (gbps * 1e9)
        assert abs(x[pct_key] - expected) < 1e-3 * expected
    pcts = sorted(x[pct_key] for x in passes)
    assert abs(d[pct_key] - (pcts[0] + pcts[1]) / 2) < 1e-3 * d[pct_key]
    floors = sorted(max(x[readings_key]) for x in passes)
    assert abs(d[row_gbps_key] - (floors[0] + floors[1]) / 2) < 1e-3 * d[row_gbps_key]


def test_quick_benchmark_writes_consistent_figures():
    result = subprocess.run([sys.executable, "bench/run.py", "--quick", "--threads", "1", "--routings",
                             "native,top_p:0.5", "--kv-dtype", "f16", "--decode-runs", "2",
                             "--moe-pairs", "2", "--pair-routing", "top_p:0.5"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| threads | routing |" in result.stdout
    report = json.loads((REPO / "bench" / "out" / "latest.json").read_text())
    assert report["settings"]["kv_dtype"] == "f16" and report["settings"]["quick"] is True
    rows = report["results"]
    assert [r["routing"] for r in rows] == ["native", "top_p:0.5"]
    for r in rows:
        d = r["decode"]
        assert r["kv_dtype"] == "f16" and r["threads"] == 1
        assert d["tok_s"] > 0 and r["prefill"]["tok_s"] > 0
        assert d["bytes_per_token"] == 2 * d["activated_parameters_per_token"]  # bf16 weights
        # Each decode pass is judged against the better bandwidth probe next to it (one before the
        # first pass, one after every pass); the row reports the medians.
        passes = d["passes"]
        assert len(passes) == r["decode_runs"] == 2
        assert min(x["seconds"] for x in passes) == d["seconds"]
        check_passes_judged(d, "bandwidth_probes_gbps", "pct_of_floor", "bandwidth_gbps")
        assert abs(d["floor_tok_s"] - d["bandwidth_gbps"] * 1e9 / d["bytes_per_token"]) < 1e-3 * d["floor_tok_s"]
        # The same against the sustained reads, which follow the probes (--quick: 100 ms each).
        assert d["sustained_ms"] == 100
        check_passes_judged(d, "sustained_probes_gbps", "pct_of_sustained_floor", "sustained_bandwidth_gbps")
    native, top_p = rows
    assert native["decode"]["mean_experts_per_token"] == 8
    assert 1 <= top_p["decode"]["mean_experts_per_token"] < 8
    assert len(report["bandwidth"]["probes"]) == 6  # before the first pass and after each, per row
    assert all(p["threads"] == 1 and p["gbps"] > 0 for p in report["bandwidth"]["probes"])
    assert report["settings"]["sustained_ms"] == report["bandwidth"]["sustained_ms"] == 100
    assert len(report["bandwidth"]["sustained_probes"]) == 6
    assert "| % of sustained |" in result.stdout

    # Prefill against the core's f32 FMA peak (bench/fma_peak.c, read before and after the runs,
    # the best reading per width counting), of the width the row's prefill kernel uses.
    peak = report["fma_peak"]
    assert len(peak["readings"]) == 2
    assert peak["avx2_gflops"] == max(r["avx2_gflops"] for r in peak["readings"]) > 0
    assert peak["avx512_gflops"] == max(r["avx512_gflops"] for r in peak["readings"])
    assert peak["fma_peak_gflops_per_core"] == max(peak["avx2_gflops"], peak["avx512_gflops"])
    for r in rows:
        kernel = dict(pair.split("=", 1) for pair in r["system_info"].split())["prefill"]
        width = peak["avx512_gflops"] if kernel == "avx512" else peak["avx2_gflops"]
        expected = 100 * r["prefill"]["gflops"] / (r["threads"] * width)
        assert abs(r["prefill"]["pct_of_fma_peak"] - expected) < 1e-9 * expected
    assert "| % of FMA peak |" in result.stdout and "f32 FMA peak per core" in result.stdout
    # Prefill FLOPs: the LM head runs for the last position only; the attention part (q/k/v/o
    # projections of every token, causal scores and weighted sums) over its own time.
    for r in rows:
        f, tokens, head = r["prefill"], r["prompt_tokens"], r["vocab_size"] * r["hidden_size"]
        flops = 2 * ((f["activated_parameters_per_token"] - head) * tokens + head)
        assert abs(f["gflops"] - flops / f["seconds"] / 1e9) < 1e-3 * f["gflops"]
        q, kv = r["num_attention_heads"] * r["head_dim"], r["num_key_value_heads"] * r["head_dim"]
        attention = r["num_layers"] * (2 * tokens * r["hidden_size"] * (2 * q + 2 * kv) + 4 * q * tokens * (tokens + 1) / 2)
        assert 0 < f["attention_seconds"] < f["seconds"] and 0 < f["moe_seconds"] < f["seconds"]
        assert abs(f["attention_gflops"] - attention / f["attention_seconds"] / 1e9) < 1e-3 * f["attention_gflops"]
        kernel = dict(pair.split("=", 1) for pair in r["system_info"].split())["prefill"]
        width = peak["avx512_gflops"] if kernel == "avx512" else peak["avx2_gflops"]
        assert abs(f["attention_pct_of_fma_peak"] - 100 * f["attention_gflops"] / (r["threads"] * width)) < 1e-6
    assert "| attention part GFLOP/s |" in result.stdout
    # Which kernels ran, as the library reports them (dynmoe_system_info), in every row and on top.
    assert report["system_info"].startswith(f"version={report['dynmoe_version']} ")
    assert all(r["system_info"] == report["system_info"] for r in rows)
    assert f"library: {report['system_info']}" in result.stdout

    # The MoE part of a decode step, from the session timing of the best decode pass.
    (group,) = report["moe_scaling"]
    assert group["threads"] == 1 and group["preset"] == "qwen3moe"
    for entry, r in zip(group["rows"], rows):
        t = r["decode"]["timing"]
        assert entry["routing"] == r["routing"]
        assert t["passes"] == r["decode_tokens"]  # the timed steps only (reset with the statistics)
        parts = t["attention_seconds"] + t["moe_seconds"] + t["dense_seconds"] + t["head_seconds"] + t["other_seconds"]
        assert 0 < t["moe_seconds"] < t["total_seconds"] <= r["decode"]["seconds"]
        assert abs(parts - t["total_seconds"]) < 1e-4 * t["total_seconds"] + 1e-5
        assert abs(entry["moe_ms"] - 1000 * t["moe_seconds"] / t["passes"]) < 1e-9 * entry["moe_ms"]
    native_entry, top_p_entry = group["rows"]
    assert native_entry["moe_speed_vs_native"] == 1.0
    assert abs(top_p_entry["moe_speed_vs_native"] - native_entry["moe_ms"] / top_p_entry["moe_ms"]) < 1e-12
    assert "MoE part of a decode step, 1 thread" in result.stdout

    # Back-to-back pairs: native, then the pair routing, each with its own timing.
    pairs = report["moe_pairs"]
    assert len(pairs) == 2
    for pair in pairs:
        assert pair["threads"] == 1 and pair["native"]["routing"] == "native"
        assert pair["other"]["routing"] == "top_p:0.5" and pair["other"]["experts_per_token"] < 8
        assert pair["native"]["moe_ms"] > 0 and pair["other"]["moe_ms"] > 0 and pair["other"]["head_ms"] > 0
        assert abs(pair["moe_speed_vs_native"] - pair["native"]["moe_ms"] / pair["other"]["moe_ms"]) < 1e-12
    assert "MoE part in back-to-back pairs, qwen3moe, 1 thread" in result.stdout


def test_sustained_reads_last_as_long_as_asked():
    """`bench --sustained-ms MS` reads for MS milliseconds of measured read time next to each
    decode pass (one read before the first pass, one after each): with 300 ms and two passes the
    run cannot take less than 0.9 s, whatever the machine's speed."""
    exe, model = bench_and_tiny_checkpoint()
    started = time.monotonic()
    result = subprocess.run([str(exe), str(model), "--threads", "1", "--prompt", "4", "--decode", "2", "--runs", "1",
                             "--decode-runs", "2", "--probe-mib", "64", "--sustained-ms", "300"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)["decode"]
    assert d["sustained_ms"] == 300 and elapsed >= 0.9
    assert all(min(x["sustained_probes_gbps"]) > 0 for x in d["passes"])


def bench_and_tiny_checkpoint() -> tuple[Path, Path]:
    """The `bench` executable and the tiny checkpoint, built and written as `run.py --quick` does."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    bench_run.build()
    model, _ = bench_run.checkpoint("qwen3moe", quick=True, seed=0)
    return Path(bench_run.BIN) / "bench", Path(model)


def test_bench_refuses_bad_probe_settings():
    """`bench --probe-mib`: a probe buffer the machine cannot hold, or a fixed --bandwidth next to
    it, is an error with a message, not a crash or a silent fallback."""
    exe, model = bench_and_tiny_checkpoint()
    cases = [(["--probe-mib", "64", "--bandwidth", "20"], "--bandwidth and --probe-mib exclude each other"),
             (["--probe-mib", str(1 << 20)], "--probe-mib 1048576 is more than half of this machine's memory"),
             (["--sustained-ms", "100"], "--sustained-ms needs --probe-mib"),
             (["--probe-mib", "64", "--sustained-ms", "-1"], "--sustained-ms: '-1' is not an integer in [0, 600000]")]
    for extra, message in cases:
        result = subprocess.run([str(exe), str(model), "--threads", "1", "--prompt", "4", "--decode", "2", "--runs", "1"]
                                + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
        assert result.stdout == ""


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "dynmoe.h"
/* Wraps dynmoe_session_eval: for every one-token call, appends the first character of the variable
   named by $SHIM_VARIABLE to $SHIM_LOG ('-' if it is unset), sleeps 50 ms if the call's number
   (from 0) is in the comma-separated $SHIM_SLOW, then calls the real function; for every longer
   call (a prefill), appends that character to $SHIM_PREFILL_LOG. */
static int calls = 0;
dynmoe_status dynmoe_session_eval(dynmoe_session *s, const int32_t *tokens, int32_t n, const dynmoe_forward_params *p,
                                  float *logits, size_t cap, dynmoe_trace **trace) {
    typedef dynmoe_status (*eval_fn)(dynmoe_session *, const int32_t *, int32_t, const dynmoe_forward_params *,
                                     float *, size_t, dynmoe_trace **);
    eval_fn real = (eval_fn)dlsym(RTLD_NEXT, "dynmoe_session_eval");
    if (n == 1) {
        FILE *f = fopen(getenv("SHIM_LOG"), "a");
        char number[16], slow[256];
        const char *value = getenv(getenv("SHIM_VARIABLE"));
        fputc(value ? value[0] : '-', f);
        fclose(f);
        snprintf(number, sizeof number, ",%d,", calls++);
        snprintf(slow, sizeof slow, ",%s,", getenv("SHIM_SLOW"));
        if (strstr(slow, number)) {
            struct timespec pause = {0, 50000000};
            nanosleep(&pause, NULL);
        }
    } else {
        FILE *f = fopen(getenv("SHIM_PREFILL_LOG"), "a");
        const char *value = getenv(getenv("SHIM_VARIABLE"));
        fputc(value ? value[0] : '-', f);
        fclose(f);
    }
    return real(s, tokens, n, p, logits, cap, trace);
}
"""


def test_alternate_switches_the_variable_on_the_documented_steps(tmp_path):
    """`bench --alternate NAME` (per-step A/B of an instrumented library build): NAME must be "1"
    on exactly the steps the schedule promises and "0" on the others — pairs of timed steps, the
    arm changing every pair and each pass starting with the other arm — and only the second step
    of each pair counted. An LD_PRELOAD shim records NAME at every one-token eval, and makes the
    first step of every pair 50 ms slow, which must not show in either arm's mean. Prefill runs
    alternate too: one untimed run with "0", then "0", "1", "1", "0" per four runs."""
    exe, model = bench_and_tiny_checkpoint()
    (tmp_path / "shim.c").write_text(SHIM)
    shim = tmp_path / "shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-I" + str(REPO / "include"), str(tmp_path / "shim.c"),
                    "-o", str(shim), "-ldl"], check=True)
    log, prefill_log = tmp_path / "steps.log", tmp_path / "prefills.log"
    env = dict(os.environ, LD_PRELOAD=str(shim), SHIM_LOG=str(log), SHIM_PREFILL_LOG=str(prefill_log),
               SHIM_VARIABLE="DYNMOE_TEST_ARM",
               SHIM_SLOW="2,4,6,8,13,15,17,19")
    env.pop("DYNMOE_TEST_ARM", None)
    result = subprocess.run([str(exe), str(model), "--threads", "1", "--prompt", "4",
                             "--runs", "6", "--warmup", "2", "--decode", "8", "--decode-runs", "2",
                             "--alternate", "DYNMOE_TEST_ARM"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    # Pass 0: 2 warm-up steps ("0"), timed pairs "0", "1", "0", "1". Pass 1: the prompt's last token
    # again (for --greedy; still "1" from pass 0), 2 warm-up steps, pairs "1", "0", "1", "0".
    assert log.read_text() == "00" + "00110011" + "1" + "00" + "11001100"
    alternate = json.loads(result.stdout)["alternate"]
    assert alternate["variable"] == "DYNMOE_TEST_ARM" and alternate["steps_per_arm"] == 4
    assert 0 < alternate["on_step_seconds"] < 0.025 and 0 < alternate["off_step_seconds"] < 0.025
    ratio = alternate["on_step_seconds"] / alternate["off_step_seconds"]
    assert abs(alternate["ratio"] - ratio) < 1e-4 * ratio
    assert prefill_log.read_text() == "0" + "011001"
    row = json.loads(result.stdout)
    prefill = row["prefill_alternate"]
    assert prefill["runs_per_arm"] == 3
    assert 0 < prefill["on_best_seconds"] <= prefill["on_median_seconds"]
    assert 0 < prefill["off_best_seconds"] <= prefill["off_median_seconds"]
    assert abs(prefill["ratio"] - prefill["on_median_seconds"] / prefill["off_median_seconds"]) < 1e-4 * prefill["ratio"]
    assert abs(min(prefill["on_best_seconds"], prefill["off_best_seconds"]) - row["prefill"]["seconds"]) < 2e-6
    assert len(row["prefill"]["all_seconds"]) == 6

    refused = subprocess.run([str(exe), str(model), "--decode", "6", "--alternate", "X"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--decode to be a multiple of 4" in refused.stderr
    refused = subprocess.run([str(exe), str(model), "--decode", "8", "--runs", "3", "--alternate", "X"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--runs to be even" in refused.stderr


def _results_file(path, passes_by_row, describe):
    """A results file as bench/run.py writes it, reduced to what pool.py reads."""
    results = []
    for (threads, routing), passes in passes_by_row.items():
        results.append({"preset": "qwen3moe", "threads": threads, "routing": routing,
                        "decode": {"passes": [{"pct_of_floor": s, "pct_of_sustained_floor": u} if u is not None
                                              else {"pct_of_floor": s} for s, u in passes]}})
    path.write_text(json.dumps({"git": {"describe": describe}, "results": results}))
    return str(path)


def test_pool_takes_the_median_over_the_passes_of_all_files(tmp_path):
    a = _results_file(tmp_path / "a.json", {(1, "native"): [(80, 90), (86, 84), (90, 95)],
                                            (2, "top_k:2"): [(70, 88), (75, 89), (99, 70)]}, "c1")
    # A run without sustained reads counts for the strict figure only.
    b = _results_file(tmp_path / "b.json", {(1, "native"): [(84, None), (88, None)],
                                            (2, "top_k:2"): [(84, None), (86, None)]}, "c2")
    out = subprocess.run([sys.executable, "bench/pool.py", "--json", a, b], cwd=REPO, capture_output=True,
                         text=True, check=True)
    rows = {(r["threads"], r["routing"]): r for r in json.loads(out.stdout)["rows"]}
    native, topk = rows[(1, "native")], rows[(2, "top_k:2")]
    assert native["passes"] == 5 and native["strict"]["median"] == 86 and native["strict"]["passes_at_threshold"] == 3
    assert native["sustained"]["passes"] == 3 and native["sustained"]["median"] == 90
    assert native["sustained"]["passes_at_threshold"] == 2
    assert topk["strict"]["median"] == 84 and topk["strict"]["passes_at_threshold"] == 2
    assert topk["sustained"]["median"] == 88

    table = subprocess.run([sys.executable, "bench/pool.py", "--threshold", "85", a, b], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "commit(s) c1, c2" in table
    assert "reaches 85 % of the strict floor: 1 of 2" in table
    assert "reaches 85 % of the sustained reads: 2 of 2" in table


def test_pool_refuses_a_file_that_is_not_a_results_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    out = subprocess.run([sys.executable, "bench/pool.py", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "not a bench/run.py results file" in out.stderr
    missing = subprocess.run([sys.executable, "bench/pool.py", str(tmp_path / "none.json")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "cannot read" in missing.stderr


def test_gemm_ab_compares_kernel_variants_in_one_process(tmp_path):
    """`bench/gemm_ab.sh` (kernel variants alternating in one process): identical variants must
    report the same bits, a variant whose sums are scaled by 1 + 2^-23 other bits, and every
    variant gets a GFLOP/s line; bad arguments are refused with a message."""
    kernel = REPO / "Sources" / "CKernels" / "gemm_bf16.c"
    source = kernel.read_text()
    exact = "float s = sums[t * rows + r];"
    assert exact in source, "the mutation below no longer applies to gemm_bf16.c"
    mutated = tmp_path / "scaled.c"
    mutated.write_text(source.replace(exact, "float s = sums[t * rows + r] * (1.0f + 0x1p-23f);"))
    result = subprocess.run([str(REPO / "bench" / "gemm_ab.sh"), str(kernel), str(kernel), str(mutated),
                             "--", "12", "64", "256", "2", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    flags = Path("/proc/cpuinfo").read_text().split()
    if not {"avx2", "fma"} <= set(flags):
        assert result.returncode == 1 and "has no kernel" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "v1 (gemm_bf16.c): same bits (0 of 768 outputs differ from v0 (gemm_bf16.c))" in lines
    scaled = [line for line in lines if line.startswith("v2 (scaled.c): other bits")]
    assert len(scaled) == 1 and " 0 of " not in scaled[0]
    for name in ("v0 (gemm_bf16.c)", "v1 (gemm_bf16.c)", "v2 (scaled.c)"):
        figures = [line for line in lines if line.startswith(name + ": mean ")]
        assert len(figures) == 1, result.stdout
        mean, best = float(figures[0].split()[3]), float(figures[0].split()[5])
        assert 0 < mean <= best

    refused = subprocess.run([str(REPO / "bench" / "gemm_ab.sh"), str(kernel), "--", "0", "64", "256"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "M must be an integer in [1, 4096], got '0'" in refused.stderr
