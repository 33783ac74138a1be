"""The plotting examples: examples/plot_expert_usage.py and examples/plot_routing_sweep.py.

Each script runs as a subprocess (`sys.executable SCRIPT ...`, exactly as a user runs it) on data
made from the fixtures by the C examples (build/bin/expert_table, build/bin/routing_sweep — built by
`make examples`) or by the Python binding, and must write a complete PNG of sensible size; bad input
must give a nonzero exit status and a one-line message, never a traceback.

Only a missing matplotlib skips these tests; a missing C example fails them.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, reference

pytest.importorskip("matplotlib", reason="the plotting examples need matplotlib (python3 -m pip install matplotlib)")

EXPERT_USAGE = REPO / "examples" / "plot_expert_usage.py"
ROUTING_SWEEP = REPO / "examples" / "plot_routing_sweep.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(args, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def run_script(script: Path, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, script, *args], stdin=stdin)


def example_binary(name: str) -> Path:
    path = REPO / "build" / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: build the C examples with `make examples` (`make test` does) "
                    f"before running these tests")
    return path


def assert_ok(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, (f"{what} exited with {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")


def assert_png(path: Path, min_size=(600, 400)) -> tuple:
    """`path` is a complete, non-trivial PNG; returns (width, height)."""
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert len(data) > 20_000, f"{path} is only {len(data)} bytes"
    assert data[:8] == PNG_MAGIC, f"{path} does not start with the PNG signature"
    assert data[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
    width, height = struct.unpack(">II", data[16:24])
    assert min_size[0] <= width <= 5000 and min_size[1] <= height <= 5000, f"{path} is {width}x{height}"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND", f"{path} is truncated (no IEND chunk at the end)"
    return width, height


def model_dir(name: str) -> Path:
    return reference(name).model_dir


def expert_table_json(tmp_path: Path, fixture: str, *options) -> Path:
    out = tmp_path / f"{fixture}.stats.json"
    result = run([example_binary("expert_table"), model_dir(fixture), *options, "--json", out])
    assert_ok(result, "expert_table")
    return out


# --------------------------------------------------------------------------------------------
# plot_expert_usage.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, routing", [("olmoe-tiny", "top_p:0.5"), ("qwen2moe-tiny", "native"),
                                              ("dynamic-moe-tiny", "top_p:0.4")])
def test_expert_usage_from_expert_table_json(tmp_path, fixture, routing):
    # qwen2moe-tiny and dynamic-moe-tiny have dense layers between the MoE layers
    stats = expert_table_json(tmp_path, fixture, "--routing", routing)
    png = tmp_path / "usage.png"
    result = run_script(EXPERT_USAGE, stats, "-o", png)
    assert_ok(result, "plot_expert_usage.py")
    assert_png(png)
    assert str(png) in result.stdout


def test_expert_usage_from_binding_json_on_stdin(tmp_path, models):
    model = models("mixtral-tiny")
    model.reset_stats()
    model.forward(reference("mixtral-tiny").input_ids)
    png = tmp_path / "usage.png"
    result = run_script(EXPERT_USAGE, "-", "-o", png, stdin=model.stats().to_json())
    assert_ok(result, "plot_expert_usage.py -")
    assert_png(png)


def test_expert_usage_run_mode_matches_expert_table(tmp_path):
    fixture, options = "olmoe-tiny", ["--routing", "top_p:0.5", "--batch", "2", "--tokens", "24", "--seed", "3"]
    png, saved = tmp_path / "usage.png", tmp_path / "run.json"
    result = run_script(EXPERT_USAGE, "--run", model_dir(fixture), *options, "--save-json", saved, "-o", png)
    assert_ok(result, "plot_expert_usage.py --run")
    assert_png(png)
    # the same pseudo-random ids as the C examples, so the same statistics as expert_table
    expected = json.loads(expert_table_json(tmp_path, fixture, *options).read_text())
    assert json.loads(saved.read_text()) == expected


def test_expert_usage_run_mode_documented_command(tmp_path):
    png = tmp_path / "usage.png"
    result = run_script(EXPERT_USAGE, "--run", "Tests/Fixtures/olmoe-tiny/model", "--routing", "top_p:0.5", "-o", png)
    assert_ok(result, "plot_expert_usage.py --run")
    assert_png(png)


def test_expert_usage_many_layers(tmp_path):
    """More than 16 MoE layers switch the histograms to one layer x k heatmap."""
    doc = json.loads(expert_table_json(tmp_path, "olmoe-tiny", "--routing", "top_p:0.6").read_text())
    moe = [layer for layer in doc["layers"] if layer["is_moe"]]
    layers = []
    for index in range(20):
        layer = copy.deepcopy(moe[index % len(moe)])
        layer["layer"] = index
        layers.append(layer)
    doc["layers"] = layers
    doc["summary"]["num_layers"] = doc["summary"]["num_moe_layers"] = len(layers)
    stats = tmp_path / "many.json"
    stats.write_text(json.dumps(doc))
    png = tmp_path / "usage.png"
    assert_ok(run_script(EXPERT_USAGE, stats, "-o", png), "plot_expert_usage.py")
    assert_png(png)


def _stats_doc(tmp_path) -> dict:
    return json.loads(expert_table_json(tmp_path, "qwen2moe-tiny").read_text())


def _bad_documents(tmp_path):
    """(name, file content, expected words in the message)."""
    good = _stats_doc(tmp_path)

    def edited(edit) -> str:
        doc = copy.deepcopy(good)
        edit(doc)
        return json.dumps(doc)

    def first_moe(doc) -> dict:
        return next(layer for layer in doc["layers"] if layer["is_moe"])

    return [
        ("other-schema", edited(lambda d: d.update(schema="dynmoe.trace")), "not a dynmoe statistics file"),
        ("no-schema", edited(lambda d: d.pop("schema")), "no \"schema\" field"),
        ("version-2", edited(lambda d: d.update(version=2)), "unsupported dynmoe.stats version 2"),
        ("version-string", edited(lambda d: d.update(version="1")), "unsupported dynmoe.stats version '1'"),
        ("no-version", edited(lambda d: d.pop("version")), "no \"version\" field"),
        ("not-json", "expert 3: 29 tokens\n", "not valid JSON"),
        ("empty", "", "is empty"),
        ("json-list", "[1, 2, 3]", "expected a JSON object"),
        ("short-counts", edited(lambda d: first_moe(d)["expert_token_counts"].pop()),
         "expert_token_counts must be a list of 6"),
        ("negative-count", edited(lambda d: first_moe(d)["experts_per_token_histogram"].__setitem__(0, -1)),
         "experts_per_token_histogram must be a list of 7"),
        ("layer-count", edited(lambda d: d["layers"].pop()), "summary.num_layers is 3"),
        ("no-tokens", edited(lambda d: d["summary"].update(tokens=0)), "no tokens"),
    ]


def test_expert_usage_rejects_bad_input(tmp_path):
    failures = []
    for name, content, expected in _bad_documents(tmp_path):
        stats, png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
        stats.write_text(content)
        result = run_script(EXPERT_USAGE, stats, "-o", png)
        message = result.stderr.strip()
        if (result.returncode != 1 or expected not in message or not message.startswith("plot_expert_usage.py: error:")
                or "Traceback" in result.stderr or png.exists()):
            failures.append(f"{name}: exit {result.returncode}, stderr {result.stderr!r}, png written {png.exists()}")
    assert not failures, "\n".join(failures)


def test_expert_usage_missing_file(tmp_path):
    result = run_script(EXPERT_USAGE, tmp_path / "absent.json", "-o", tmp_path / "x.png")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, expected", [
    ([], "give either STATS.json or --run MODEL_DIR"),
    (["stats.json", "--routing", "top_p:0.5"], "only apply with --run"),
])
def test_expert_usage_usage_errors(args, expected):
    result = run_script(EXPERT_USAGE, *args)
    assert result.returncode == 2
    assert expected in result.stderr


@pytest.mark.parametrize("routing, expected", [("top_p:1.5", "TopP.p must be in (0, 1]"),
                                               ("top_q:0.5", "unknown routing 'top_q:0.5'")])
def test_expert_usage_run_mode_bad_routing(tmp_path, routing, expected):
    png = tmp_path / "x.png"
    result = run_script(EXPERT_USAGE, "--run", model_dir("olmoe-tiny"), "--routing", routing, "-o", png)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not png.exists()


def test_expert_usage_run_mode_bad_model(tmp_path):
    result = run_script(EXPERT_USAGE, "--run", tmp_path / "no-such-model", "-o", tmp_path / "x.png")
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# plot_routing_sweep.py
# --------------------------------------------------------------------------------------------


def routing_sweep_csv(fixture: str, *options) -> str:
    result = run([example_binary("routing_sweep"), model_dir(fixture), "--csv", *options])
    assert_ok(result, "routing_sweep --csv")
    assert result.stdout.startswith("threshold,mean_experts_per_token,"), result.stdout[:200]
    return result.stdout


@pytest.mark.parametrize("fixture", ["olmoe-tiny", "qwen2moe-tiny"])
def test_routing_sweep_from_stdin(tmp_path, fixture):
    png = tmp_path / "sweep.png"
    result = run_script(ROUTING_SWEEP, "-", "-o", png, stdin=routing_sweep_csv(fixture))
    assert_ok(result, "plot_routing_sweep.py -")
    assert_png(png)


def test_routing_sweep_from_file_unsorted_thresholds(tmp_path):
    csv_path, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    csv_path.write_text(routing_sweep_csv("mixtral-tiny", "--thresholds", "0.9,0.05,0.5,0.3", "--batch", "2"))
    result = run_script(ROUTING_SWEEP, csv_path, "-o", png, "--title", "mixtral-tiny, 2 x 64 tokens")
    assert_ok(result, "plot_routing_sweep.py")
    assert_png(png)


def test_routing_sweep_shell_pipeline(tmp_path):
    """The documented command line: routing_sweep MODEL --csv | python3 plot_routing_sweep.py - -o sweep.png."""
    png = tmp_path / "sweep.png"
    binary = example_binary("routing_sweep")
    command = f"'{binary}' Tests/Fixtures/olmoe-tiny/model --csv | '{sys.executable}' '{ROUTING_SWEEP}' - -o '{png}'"
    result = subprocess.run(["/bin/sh", "-c", f"set -e; {command}"], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert_ok(result, command)
    assert_png(png)


def test_routing_sweep_rejects_bad_input(tmp_path):
    table = run([example_binary("routing_sweep"), model_dir("olmoe-tiny"), "--thresholds", "0.5"])
    assert_ok(table, "routing_sweep")
    header = "threshold,mean_experts_per_token,activated_parameters_per_token,activated_fraction,layer0_mean\n"
    cases = [
        ("table output", table.stdout, "run routing_sweep with --csv"),
        ("empty", "", "is empty"),
        ("stats json", json.dumps(_stats_doc(tmp_path)), "is not routing_sweep CSV"),
        ("header only", header, "no rows"),
        ("not a number", header + "0.5,abc,1,0.1,1\n", "line 2: not a number"),
        ("short row", header + "0.5,1,1,0.1\n", "line 2: 4 fields"),
        ("bad threshold", header + "1.5,1,1,0.1,1\n", "threshold 1.5 is not in (0, 1]"),
        ("bad column", header.replace("layer0_mean", "experts"), "unexpected column 'experts'"),
    ]
    failures = []
    for name, text, expected in cases:
        png = tmp_path / "bad.png"
        result = run_script(ROUTING_SWEEP, "-", "-o", png, stdin=text)
        message = result.stderr.strip()
        if (result.returncode != 1 or expected not in message or not message.startswith("plot_routing_sweep.py: error:")
                or "Traceback" in result.stderr or png.exists()):
            failures.append(f"{name}: exit {result.returncode}, stderr {result.stderr!r}, png written {png.exists()}")
    assert not failures, "\n".join(failures)
