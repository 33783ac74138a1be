"""The C example examples/stream.c, run as a user runs it (build/bin/stream, built by `make examples`).

Its greedy continuation of each fixture's first prompt must be the reference's greedy tokens
(native routing), whatever the KV-cache element type; a bad --kv-dtype is a one-line usage error.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import FIXTURE_NAMES, REPO, reference

STREAM = REPO / "build" / "bin" / "stream"


def run_stream(*args) -> subprocess.CompletedProcess:
    if not STREAM.is_file():
        pytest.fail(f"{STREAM} is missing: build the C examples with `make examples` (`make test` does)")
    return subprocess.run([str(STREAM), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO)


def generated_tokens(stdout: str) -> list[int]:
    lines = [line for line in stdout.splitlines() if line.startswith("generated:")]
    assert len(lines) == 1, stdout
    return [int(t) for t in lines[0].split(":", 1)[1].split()]


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_stream_reproduces_the_greedy_reference(name, kv_dtype):
    ref = reference(name)
    expected = [int(t) for t in ref.tensor("native", "greedy")[0]]
    prompt = [int(t) for t in ref.input_ids[0]]
    result = run_stream(REPO / "Tests" / "Fixtures" / name / "model", *prompt, "--max-new", len(expected),
                        "--ignore-eos", "--kv-dtype", kv_dtype)
    assert result.returncode == 0, result.stderr
    assert generated_tokens(result.stdout) == expected


def test_stream_rejects_an_unknown_kv_dtype():
    result = run_stream(REPO / "Tests" / "Fixtures" / "mixtral-tiny" / "model", "--kv-dtype", "f8")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --kv-dtype must be f32, f16 or bf16, got 'f8' (see --help)"


def test_stream_reports_where_the_time_went():
    """The closing timing lines: one forward pass for the prompt and one per generated token,
    every position counted once, the parts adding up to the total."""
    prompt = [55, 74, 38]
    result = run_stream(REPO / "Tests" / "Fixtures" / "mixtral-tiny" / "model", *prompt, "--max-new", 6,
                        "--ignore-eos", "--routing", "top_p:0.5")
    assert result.returncode == 0, result.stderr
    generated = generated_tokens(result.stdout)
    lines = result.stdout.splitlines()
    (header,) = [line for line in lines if line.startswith("time in ")]
    words = header.split()
    passes, positions, total = int(words[2]), int(words[5].lstrip("(")), float(words[7])
    assert passes == 1 + len(generated) and positions == len(prompt) + len(generated)
    parts_line = lines[lines.index(header) + 1]
    parts = [float(p.split()[-2]) for p in parts_line.split(",")]
    assert len(parts) == 5 and all(p >= 0 for p in parts) and parts[1] > 0  # MoE blocks took time
    assert abs(sum(parts) - total) <= 0.01
