#!/usr/bin/env python3
"""dynmoe performance benchmark (`make bench`).

What is measured, and how:

1. A random-weight checkpoint is generated if missing (bench/make_checkpoint.py): by default a
   Qwen3-MoE layout of ~1.72 B parameters in bf16 (hidden 1024, 16 layers, 64 experts top-8,
   ~277 M parameters activated per token), ~3.4 GB under bench/out/ (git-ignored). Random weights
   run exactly the same code as trained ones; the initialisation makes routing peaked per token
   and balanced across tokens, as in trained models, so top-p keeps a realistic, varying number
   of experts and a prompt spreads over all experts.
2. Memory read bandwidth (bench/read_probe.h): the best of several sums over a 256 MiB buffer with
   AVX2 loads at the row's thread count, over seven read patterns (1, 2 or 4 streams side by side,
   with and without software prefetch, including the decode kernel's own; one stream alone does
   not reach what a core can read). This is the ceiling of a memory-bound decoder. It drifts by
   20-30 % over minutes on the project VM, so `bench` probes it itself (in a child process, so
   the buffer never counts in its memory figures) right before the first decode pass and right
   after every pass, and judges each pass against the better of the two probes next to it.
   Each probe is followed by a sustained read (--sustained-ms, default 1000): the winning pattern
   read over and over for as long as a decode pass takes, total bytes over total time. The best
   of many short reads is what the memory gives at its best moments; the sustained read is what
   a streaming read averages over a pass, which on the project VM is 10-25 % less.
3. For each thread count (1, 2) and each routing policy (native top-8, top_k:4, top_k:2,
   top_p:0.4, top_p:0.6, top_p:0.8), one process of bench/bench.c (C, through libdynmoe's C API)
   loads the model (timed; resident memory recorded) and measures:
   - prefill: one session eval of a 128-token prompt from position 0, best of 3;
   - decode: 64 single-token session evals after the prompt (after 4 untimed warm-up steps),
     best of 3 passes (each restarting at the end of the prompt);
   - the session's routing statistics over the timed decode steps: mean experts per token and
     activated parameters per token.
4. Derived figures, per row:
   - bytes/token  = activated parameters per token x bytes per weight (2 for bf16): the weight
                    bytes a decode step must read at least once (the embedding row is ignored);
   - GB/s         = bytes/token x decode tokens/s: the effective weight-read bandwidth;
   - % of floor   = a decode pass's tokens/s / (bandwidth / bytes per token), the bandwidth floor
                    being the time to stream those bytes once at the bandwidth probed next to that
                    pass (step 2); the median over the row's passes; 100 % = perfectly
                    memory-bound;
   - % of sustained = the same against the better sustained read next to each pass;
   - prefill GFLOP/s = the matrix products' FLOPs / prefill time: 2 x (activated parameters per
                    token over the prompt - the LM head's) x 128 + 2 x the LM head's (it runs
                    for the last position only; counted for all 128 before 0.5.0);
   - % of FMA peak = prefill GFLOP/s / (threads x the core's f32 FMA peak), the peak measured
                    by bench/fma_peak.c (chains of FMAs, AVX2 and, where the CPU has it,
                    AVX-512) before and after the runs, the better reading counting (a slow
                    phase of the machine only lowers it), and of the width the library's
                    prefill kernel uses (dynmoe_system_info: AVX-512 where it runs);
   - attention part GFLOP/s = the attention sub-blocks of the best prefill alone (their time
                    from dynmoe_session_get_timing): the q/k/v/o projections of all 128 tokens,
                    the prefill's large matrix products, plus the scores and weighted sums;
                    with its share of the FMA peak;
   - x native     = decode tokens/s of the routing / decode tokens/s of native routing, i.e. the
                    end-to-end speed-up of using fewer experts per token.
   Figures are printed and saved; nothing is asserted.

Results are printed as a Markdown table and written, with the machine (CPU model, cores), the
git commit and the exact settings, to bench/out/results-<timestamp>.json and
bench/out/latest.json.

Usage:
  python3 bench/run.py                      # qwen3moe, threads 1 and 2, seven routings
  python3 bench/run.py --moe-pairs 3        # plus 3 back-to-back native / top_p:0.55 pairs per thread count
  python3 bench/run.py --preset paper       # the paper's MoEForCausalLM layout (also: --preset all)
  python3 bench/run.py --quick              # tiny checkpoints and short runs: a smoke test in seconds
  python3 bench/run.py --threads 2 --routings native,top_p:0.5 --decode 128
  python3 bench/run.py --prompt 2048 --kv-dtype f16   # long context with a half-size KV cache
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
BIN = os.path.join(ROOT, "build", "bin")
LIBDIR = os.path.join(ROOT, "build", "lib")
DEFAULT_ROUTINGS = "native,top_k:4,top_k:2,top_p:0.4,top_p:0.55,top_p:0.6,top_p:0.8"
CHECKPOINT_DIRS = {"qwen3moe": "qwen3moe-1.7b", "paper": "paper-1.7b"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, capture=False):
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    if capture:
        return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout
    subprocess.run(cmd, check=True, cwd=ROOT)
    return None


def machine_info():
    info = {"cpu_model": None, "logical_cpus": os.cpu_count(), "physical_cores": None,
            "flags": [], "mem_total_kib": None, "kernel": platform.release(), "machine": platform.machine()}
    try:
        cores = set()
        phys = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and info["cpu_model"] is None:
                    info["cpu_model"] = value
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    cores.add((phys, value))
                elif key == "flags" and not info["flags"]:
                    flags = value.split()
                    info["flags"] = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16")
                                     if f in flags]
        info["physical_cores"] = len(cores) or None
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_kib"] = int(line.split()[1])
    except OSError:
        pass
    try:
        info["compiler"] = subprocess.run(["cc", "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        pass
    return info


def git_info():
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "describe": git("describe", "--always", "--dirty"),
            "dirty": bool(status) if status is not None else None}


def library_info():
    path = os.path.realpath(os.path.join(LIBDIR, "libdynmoe.so"))
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone().isoformat(timespec="seconds")
    except OSError:
        return {"path": os.path.relpath(path, ROOT)}
    return {"path": os.path.relpath(path, ROOT), "sha256": digest, "modified": mtime}


def build():
    lib = os.path.join(LIBDIR, "libdynmoe.so")
    if not os.path.exists(lib):
        sys.exit(f"error: {lib} is missing; run `make lib` first")
    os.makedirs(BIN, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    run([cc, "-O3", "-march=native", "-std=c99", "-pthread", "bench/bandwidth.c", "-o", os.path.join(BIN, "bandwidth")])
    run([cc, "-O2", "-std=c99", "-mavx2", "-mfma", "bench/fma_peak.c", "-o", os.path.join(BIN, "fma_peak")])
    run([cc, "-O2", "-march=native", "-std=c99", "-pthread", "-Iinclude", "bench/bench.c", "-L" + LIBDIR, "-ldynmoe",
         "-Wl,-rpath," + LIBDIR, "-lm", "-o", os.path.join(BIN, "bench")])


def checkpoint(preset, quick, seed):
    name = CHECKPOINT_DIRS[preset] + ("-tiny" if quick else "")
    path = os.path.join(OUT, name)
    cmd = [sys.executable, os.path.join(HERE, "make_checkpoint.py"), "--preset", preset, "--out", path,
           "--seed", str(seed)]
    if quick:
        cmd.append("--tiny")
    run(cmd)
    with open(os.path.join(path, "bench-checkpoint.json")) as f:
        return path, json.load(f)


def fmt_params(n):
    return f"{n / 1e6:.1f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def fmt_bytes(n):
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def fmt_rate(x):
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def per_step_ms(timing, part):
    """Milliseconds per decode step of one part of `decode.timing` ("total_seconds", "moe_seconds", ...)."""
    return 1000 * timing[part] / max(1, timing["passes"])


def moe_scaling(results):
    """The MoE part of a decode step per routing, measured: `dynmoe_session_get_timing` of the
    best decode pass (time in MoE blocks: router, selection, experts, weighted sum), per preset
    and thread count. `moe_speed_vs_native` is native routing's MoE time per token over this
    routing's (2.0 for half of native's experts if the MoE part is exactly proportional to the
    experts run); `fixed_ms` is the rest of a step (attention, LM head, ...), the part skipping
    experts cannot save.
    """
    groups = []
    for preset in dict.fromkeys(r["preset"] for r in results):
        for threads in dict.fromkeys(r["threads"] for r in results if r["preset"] == preset):
            rows = [r for r in results if r["preset"] == preset and r["threads"] == threads]
            entries = []
            for r in rows:
                t = r["decode"]["timing"]
                step, moe = per_step_ms(t, "total_seconds"), per_step_ms(t, "moe_seconds")
                entries.append({"routing": r["routing"], "experts_per_token": r["decode"]["mean_experts_per_token"],
                                "step_ms": step, "moe_ms": moe, "fixed_ms": step - moe})
            native = next((e for e in entries if e["routing"] == "native"), None)
            for e in entries:
                e["moe_speed_vs_native"] = native["moe_ms"] / e["moe_ms"] if native and e["moe_ms"] > 0 else None
            groups.append({"preset": preset, "threads": threads, "rows": entries})
    return groups


def per_thread_ranges(readings):
    """'1 thread 19.8–24.4 GB/s, 2 threads ...' from [{"threads": t, "gbps": g}, ...]."""
    parts = []
    for t in sorted(set(x["threads"] for x in readings)):
        g = [x["gbps"] for x in readings if x["threads"] == t]
        parts.append(f"{t} thread{'s' if t > 1 else ''} {min(g):.1f}–{max(g):.1f} GB/s")
    return ", ".join(parts)


def row_readings(passes, key):
    """The bandwidth readings of one row in order: before the first pass, then after each pass
    (neighbouring passes share one)."""
    return [passes[0][key][0]] + [x[key][1] for x in passes]


def fma_peak():
    """One reading of the core's f32 FMA peak (bench/fma_peak.c), or None where it cannot run."""
    try:
        return json.loads(run([os.path.join(BIN, "fma_peak")], capture=True))
    except (OSError, ValueError, subprocess.CalledProcessError, SystemExit):
        return None


def best_fma_peak(readings):
    """The best of several readings per width (a peak is a maximum: a slow phase of the machine
    only lowers a reading; on the project VM one reading came out at 124 against 163-175 GFLOP/s),
    with the readings kept; None without any."""
    readings = [r for r in readings if r]
    if not readings:
        return None
    avx2 = max(r["avx2_gflops"] for r in readings)
    avx512 = max(r["avx512_gflops"] for r in readings)
    return {"fma_peak_gflops_per_core": max(avx2, avx512), "avx2_gflops": avx2, "avx512_gflops": avx512,
            "readings": readings}


def kernel_peak(row, peak):
    """The FMA peak of the width the row's prefill kernel uses (dynmoe_system_info "prefill=")."""
    kernel = dict(pair.split("=", 1) for pair in row.get("system_info", "").split() if "=" in pair).get("prefill")
    if kernel == "avx512" and peak["avx512_gflops"]:
        return peak["avx512_gflops"]
    if kernel in ("avx2", "swift"):
        return peak["avx2_gflops"]
    return peak["fma_peak_gflops_per_core"]


def pct_of_fma_peak(row, peak, key="gflops"):
    """A prefill rate (`key`: the whole model's "gflops", or the attention part's
    "attention_gflops") as a share of the threads' FMA peak."""
    if not peak or row["prefill"].get(key) is None:
        return None
    return 100 * row["prefill"][key] / (row["threads"] * kernel_peak(row, peak))


def fmt_attention(prefill):
    """The attention part's GFLOP/s, with its share of the FMA peak when known."""
    gflops = prefill.get("attention_gflops")
    if gflops is None:
        return "–"
    pct = prefill.get("attention_pct_of_fma_peak")
    return f"{gflops:.1f}" + (f" ({pct:.0f} %)" if pct is not None else "")


def print_report(results, bandwidth, machine, git, out=sys.stdout, peak=None):
    p = lambda s="": print(s, file=out)
    p()
    p(f"machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs "
      f"({', '.join(machine['flags'])}), {(machine['mem_total_kib'] or 0) / 1048576:.0f} GiB")
    p(f"commit:  {git['describe'] or '?'}")
    if results and results[0].get("system_info"):
        p(f"library: {results[0]['system_info']} (dynmoe_system_info)")
    if peak:
        p(f"f32 FMA peak per core (bench/fma_peak.c, best of {len(peak.get('readings', [peak]))} readings): "
          f"{peak['fma_peak_gflops_per_core']:.1f} GFLOP/s "
          f"(AVX2 {peak['avx2_gflops']:.1f}" + (f", AVX-512 {peak['avx512_gflops']:.1f}" if peak["avx512_gflops"] else "")
          + ")")
    p("read bandwidth (probes next to each decode pass): " + per_thread_ranges(bandwidth["probes"]))
    if bandwidth.get("sustained_probes"):
        p(f"sustained reads ({bandwidth['sustained_ms']} ms each, next to each pass): "
          + per_thread_ranges(bandwidth["sustained_probes"]))
    for preset in dict.fromkeys(r["preset"] for r in results):
        rows = [r for r in results if r["preset"] == preset]
        first = rows[0]
        p()
        p(f"## {preset}: {first['architecture']}, {first['total_parameters'] / 1e9:.2f} B parameters, "
          f"{first['num_experts']} experts x {first['num_moe_layers']} MoE layers, {first['dtype']}, "
          f"native {first['native_routing']}; prompt {first['prompt_tokens']} tokens, "
          f"decode {first['decode_tokens']} tokens")
        p()
        sustained = all("pct_of_sustained_floor" in r["decode"] for r in rows)
        p("| threads | routing | experts/token | active params/token | bytes/token | prefill tok/s | "
          "prefill GFLOP/s | " + ("% of FMA peak | " if peak else "") + "attention part GFLOP/s | "
          "decode tok/s | GB/s | bandwidth GB/s | % of floor | "
          + ("sustained GB/s | % of sustained | " if sustained else "") + "× native |")
        p("| ---: | :--- | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if peak else "") + "---: | ---: | ---: | ---: | ---: | "
          + ("---: | ---: | " if sustained else "") + "---: |")
        for r in rows:
            d, f = r["decode"], r["prefill"]
            native = next((x for x in rows if x["threads"] == r["threads"] and x["routing"] == "native"), None)
            ratio = f"{d['tok_s'] / native['decode']['tok_s']:.2f}" if native else "–"
            routing = r["routing"] + (f" ({r['native_routing']})" if r["routing"] == "native" else "")
            p(f"| {r['threads']} | {routing} | {d['mean_experts_per_token']:.2f} | "
              f"{fmt_params(d['activated_parameters_per_token'])} | {fmt_bytes(d['bytes_per_token'])} | "
              f"{fmt_rate(f['tok_s'])} | {f['gflops']:.1f} | "
              + (f"{f['pct_of_fma_peak']:.0f} % | " if peak else "")
              + fmt_attention(f) + " | "
              + f"{fmt_rate(d['tok_s'])} | {d['gbps']:.1f} | "
              f"{d['bandwidth_gbps']:.1f} | {d['pct_of_floor']:.0f} % | "
              + (f"{d['sustained_bandwidth_gbps']:.1f} | {d['pct_of_sustained_floor']:.0f} % | " if sustained else "")
              + f"{ratio} |")
        p()
        for threads in dict.fromkeys(r["threads"] for r in rows):
            r = next(x for x in rows if x["threads"] == threads)
            last = [x for x in rows if x["threads"] == threads][-1]
            m0, m1, m2 = r["memory_before_load"], r["memory_after_load"], last["memory_after_run"]
            p(f"threads {threads}: load {r['load_seconds'] * 1000:.0f} ms; RSS after load "
              f"{m1['rss_kib'] / 1024:.0f} MiB (anon {m1['anon_kib'] / 1024:.0f} MiB), after all runs "
              f"{m2['rss_kib'] / 1024:.0f} MiB (anon {m2['anon_kib'] / 1024:.0f} MiB, file-backed "
              f"{m2['file_kib'] / 1024:.0f} MiB), peak {m2['hwm_kib'] / 1024:.0f} MiB "
              f"(before load {m0['rss_kib'] / 1024:.0f} MiB)")
        threads_list = sorted(set(r["threads"] for r in rows))
        if len(threads_list) > 1:
            a, b = threads_list[0], threads_list[-1]
            parts = []
            for r in rows:
                if r["threads"] != a:
                    continue
                other = next((x for x in rows if x["threads"] == b and x["routing"] == r["routing"]), None)
                if other:
                    parts.append(f"{r['routing']} decode ×{other['decode']['tok_s'] / r['decode']['tok_s']:.2f} "
                                 f"prefill ×{other['prefill']['tok_s'] / r['prefill']['tok_s']:.2f}")
            p(f"scaling {a} → {b} threads: " + "; ".join(parts))
        for g in moe_scaling(rows):
            native = next((e for e in g["rows"] if e["routing"] == "native"), None)
            speeds = "; ".join(f"{e['routing']} {e['moe_speed_vs_native']:.2f} ({e['experts_per_token']:.2f} experts, "
                               f"{e['moe_ms']:.1f} ms)"
                               for e in g["rows"] if e["routing"] != "native" and e["moe_speed_vs_native"] is not None)
            if native:
                p(f"MoE part of a decode step, {g['threads']} thread{'s' if g['threads'] > 1 else ''} "
                  f"(dynmoe_session_get_timing): native {native['moe_ms']:.1f} of {native['step_ms']:.1f} ms per token; "
                  f"MoE part × native: {speeds}")


def print_pairs(pairs, out=sys.stdout):
    """The --moe-pairs lines: per preset and thread count, each pair's MoE part ratio and LM-head times."""
    for preset, threads in dict.fromkeys((p["preset"], p["threads"]) for p in pairs):
        group = [p for p in pairs if p["preset"] == preset and p["threads"] == threads]
        ratios = [p["moe_speed_vs_native"] for p in group if p["moe_speed_vs_native"] is not None]
        other = group[0]["other"]
        each = "; ".join(f"{p['moe_speed_vs_native']:.2f} (LM head {p['native']['head_ms']:.2f} / "
                         f"{p['other']['head_ms']:.2f} ms)" for p in group if p["moe_speed_vs_native"] is not None)
        print(f"MoE part in back-to-back pairs, {preset}, {threads} thread{'s' if threads > 1 else ''}: "
              f"{other['routing']} ({other['experts_per_token']:.2f} experts) × native = {each}; "
              f"median {statistics.median(ratios):.2f}", file=out)


def main():
    ap = argparse.ArgumentParser(description="dynmoe performance benchmark",
                                 epilog="See the docstring of bench/run.py and bench/README.md.")
    ap.add_argument("--preset", choices=["qwen3moe", "paper", "all"], default="qwen3moe")
    ap.add_argument("--quick", action="store_true", help="tiny checkpoint(s), short runs: a smoke test")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--routings", default=DEFAULT_ROUTINGS, help=f"comma-separated (default {DEFAULT_ROUTINGS})")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--decode", type=int, default=None, help="timed decode steps (default 64; 16 with --quick)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (default 4)")
    ap.add_argument("--runs", type=int, default=None, help="prefill runs, best kept (default 3; 2 with --quick)")
    ap.add_argument("--decode-runs", type=int, default=None, help="decode passes, best kept (default 3; 1 with --quick)")
    ap.add_argument("--prefetch", action="store_true", help="load with prefetch (read all weights at load)")
    ap.add_argument("--mlock", action="store_true", help="load with lock_memory (pin the weights in memory)")
    ap.add_argument("--kv-dtype", choices=["f32", "f16", "bf16"], default="f32",
                    help="how the sessions' KV cache stores keys and values (default f32)")
    ap.add_argument("--moe-pairs", type=int, default=0, metavar="N",
                    help="after the table, N back-to-back pairs of decode runs (native, then --pair-routing) per "
                         "thread count: the MoE part of a step compared within each pair (default 0: none)")
    ap.add_argument("--pair-routing", default="top_p:0.55", help="the routing --moe-pairs compares with native "
                                                                 "(default top_p:0.55, about 4 experts per token)")
    ap.add_argument("--sustained-ms", type=int, default=None, metavar="MS",
                    help="length of the sustained read next to each decode pass (default 1000; 100 with --quick; "
                         "0: none)")
    ap.add_argument("--seed", type=int, default=0, help="checkpoint seed (default 0)")
    ap.add_argument("--no-build", action="store_true", help="use the existing build/bin/{bench,bandwidth}")
    args = ap.parse_args()
    decode = args.decode or (16 if args.quick else 64)
    runs = args.runs or (2 if args.quick else 3)
    decode_runs = args.decode_runs or (1 if args.quick else 3)
    threads = [int(t) for t in args.threads.split(",")]
    presets = ["qwen3moe", "paper"] if args.preset == "all" else [args.preset]

    os.makedirs(OUT, exist_ok=True)
    started = time.time()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    machine, git = machine_info(), git_info()

    checkpoints = {p: checkpoint(p, args.quick, args.seed) for p in presets}
    if not args.no_build:
        build()
    peak_readings = [fma_peak()]

    # The machine's read bandwidth drifts over minutes (on the project VM by 20-30 %), so `bench`
    # probes it next to every decode pass, with the same thread count (--probe-mib).
    probe_mib = 128 if args.quick else 256
    sustained_ms = args.sustained_ms if args.sustained_ms is not None else (100 if args.quick else 1000)
    if sustained_ms < 0:
        sys.exit(f"error: --sustained-ms must be >= 0, got {sustained_ms}")

    def bench_command(path, t, routing, prefill_runs, probe=True):
        """The `bench` run of one routing, with this run's settings; recorded in the JSON."""
        cmd = [os.path.join(BIN, "bench"), os.path.relpath(path, ROOT), "--threads", str(t),
               "--routing", routing, "--prompt", str(args.prompt), "--decode", str(decode),
               "--warmup", str(args.warmup), "--runs", str(prefill_runs), "--decode-runs", str(decode_runs)]
        if probe:
            cmd += ["--probe-mib", str(probe_mib)]
            if sustained_ms > 0:
                cmd += ["--sustained-ms", str(sustained_ms)]
        if args.prefetch:
            cmd.append("--prefetch")
        if args.mlock:
            cmd.append("--mlock")
        if args.kv_dtype != "f32":
            cmd += ["--kv-dtype", args.kv_dtype]
        commands.append(" ".join(shlex.quote(c) for c in cmd))
        return cmd

    results, commands, probes, sustained_probes = [], [], [], []
    for preset in presets:
        path, _ = checkpoints[preset]
        for t in threads:
            for routing in args.routings.split(","):
                for line in run(bench_command(path, t, routing, runs), capture=True).splitlines():
                    if not line.strip():
                        continue
                    r = json.loads(line)
                    r["preset"] = preset
                    d = r["decode"]
                    passes = d["passes"]
                    row_probes = row_readings(passes, "bandwidth_probes_gbps")
                    probes += [{"threads": t, "gbps": g} for g in row_probes]
                    log(f"{routing} threads {t}: decode {d['tok_s']:.1f} tok/s; passes at "
                        + ", ".join(f"{x['pct_of_floor']:.0f} %" for x in passes)
                        + f" of the floor (probes {', '.join(f'{g:.1f}' for g in row_probes)} GB/s)")
                    if "pct_of_sustained_floor" in d:
                        row_sustained = row_readings(passes, "sustained_probes_gbps")
                        sustained_probes += [{"threads": t, "gbps": g} for g in row_sustained]
                        log(f"{routing} threads {t}: passes at "
                            + ", ".join(f"{x['pct_of_sustained_floor']:.0f} %" for x in passes)
                            + f" of the sustained floor (reads {', '.join(f'{g:.1f}' for g in row_sustained)} GB/s)")
                    results.append(r)
    bandwidth = {"size_mib": probe_mib, "probes": probes, "sustained_ms": sustained_ms,
                 "sustained_probes": sustained_probes}

    # Rows of the table run minutes apart, and the machine's speed drifts in between; a pair of
    # runs right after each other sees the same phase (the LM head, identical in both, shows it).
    moe_pairs = []
    for preset in presets if args.moe_pairs > 0 else []:
        path, _ = checkpoints[preset]
        for t in threads:
            for _ in range(args.moe_pairs):
                pair = {"preset": preset, "threads": t}
                for key, routing in (("native", "native"), ("other", args.pair_routing)):
                    cmd = bench_command(path, t, routing, 1, probe=False)  # MoE times only; one prefill suffices
                    r = json.loads([line for line in run(cmd, capture=True).splitlines() if line.strip()][-1])
                    timing = r["decode"]["timing"]
                    pair[key] = {"routing": routing, "experts_per_token": r["decode"]["mean_experts_per_token"],
                                 "moe_ms": per_step_ms(timing, "moe_seconds"),
                                 "head_ms": per_step_ms(timing, "head_seconds")}
                other = pair["other"]["moe_ms"]
                pair["moe_speed_vs_native"] = pair["native"]["moe_ms"] / other if other > 0 else None
                log(f"pair, threads {t}: MoE part native {pair['native']['moe_ms']:.2f} ms, {args.pair_routing} "
                    f"{other:.2f} ms")
                moe_pairs.append(pair)

    # A second reading of the FMA peak after the runs: the better one counts.
    peak = best_fma_peak(peak_readings + [fma_peak()])

    report = {
        "schema": "dynmoe.bench",
        "version": 3,
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration_seconds": round(time.time() - started, 1),
        "machine": machine,
        "git": git,
        "dynmoe_version": results[0].get("dynmoe_version") if results else None,
        "system_info": results[0].get("system_info") if results else None,
        "library": library_info(),
        "settings": {"presets": presets, "quick": args.quick, "threads": threads, "routings": args.routings.split(","),
                     "prompt_tokens": args.prompt, "decode_tokens": decode, "warmup_tokens": args.warmup,
                     "prefill_runs": runs, "decode_runs": decode_runs, "prefetch": args.prefetch, "mlock": args.mlock,
                     "kv_dtype": args.kv_dtype, "sustained_ms": sustained_ms},
        "checkpoints": {p: {"path": os.path.relpath(c[0], ROOT), "generator": c[1]} for p, c in checkpoints.items()},
        "bandwidth": bandwidth,
        "fma_peak": peak,
        "commands": commands,
        "results": results,
        "moe_scaling": moe_scaling(results),
        "moe_pairs": moe_pairs,
    }
    for r in results:
        r["prefill"]["pct_of_fma_peak"] = pct_of_fma_peak(r, peak)
        r["prefill"]["attention_pct_of_fma_peak"] = pct_of_fma_peak(r, peak, "attention_gflops")
    print_report(results, bandwidth, machine, git, peak=peak)
    print_pairs(moe_pairs)
    for name in (f"results-{stamp}.json", "latest.json"):
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    print(f"\nwrote {os.path.relpath(os.path.join(OUT, f'results-{stamp}.json'), ROOT)} and bench/out/latest.json "
          f"({report['duration_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
