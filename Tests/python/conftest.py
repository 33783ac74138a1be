"""Shared fixtures of the Python binding tests.

The tests import the bindings from the source tree (bindings/python) and load libdynmoe from
DYNMOE_LIBRARY or build/lib (run `make lib` first). Reference data comes from Tests/Fixtures.

Parametrisation (see pytest_generate_tests):
  fixture_name  every fixture directory
  fixture_run   every (fixture, run) pair of the fixtures' reference.json
  greedy_run    the (fixture, run) pairs that recorded a greedy continuation
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES_DIR = REPO / "Tests" / "Fixtures"
sys.path.insert(0, str(REPO / "bindings" / "python"))

import dynmoe  # noqa: E402

# --------------------------------------------------------------------------------------------
# A minimal safetensors reader (the safetensors package is not a dependency)
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8,
              "BF16": np.uint16, "F16": np.float16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file; BF16 tensors are widened to float32."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=_ST_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        if meta["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors


# --------------------------------------------------------------------------------------------
# Fixture data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    name: str
    model_dir: Path
    meta: dict
    tensors: dict

    @property
    def input_ids(self) -> np.ndarray:
        return self.tensors["input_ids"]

    @property
    def runs(self) -> dict:
        return {run["name"]: run for run in self.meta["runs"]}

    def tensor(self, run: str, kind: str, layer: int | None = None) -> np.ndarray:
        return self.tensors[f"{run}.{kind}" if layer is None else f"{run}.{kind}.{layer}"]


FIXTURE_NAMES = sorted(p.name for p in FIXTURES_DIR.iterdir() if (p / "reference.json").is_file())


@functools.lru_cache(maxsize=None)
def reference(name: str) -> Reference:
    directory = FIXTURES_DIR / name
    meta = json.loads((directory / "reference.json").read_text())
    return Reference(name, directory / "model", meta, read_safetensors(directory / "reference.safetensors"))


def _runs(greedy_only: bool):
    pairs = []
    for name in FIXTURE_NAMES:
        for run in reference(name).meta["runs"]:
            if not greedy_only or run.get("greedy_steps"):
                pairs.append((name, run["name"]))
    return pairs


def pytest_generate_tests(metafunc):
    if "fixture_name" in metafunc.fixturenames:
        metafunc.parametrize("fixture_name", FIXTURE_NAMES)
    for argname, greedy_only in (("fixture_run", False), ("greedy_run", True)):
        if argname in metafunc.fixturenames:
            pairs = _runs(greedy_only)
            metafunc.parametrize(argname, pairs, ids=[f"{f}/{r}" for f, r in pairs])


def policy_from_reference(routing: dict):
    """The dynmoe routing argument for a reference.json `routing` entry (null fields -> None)."""
    mode = routing["mode"]
    if mode == "native":
        return None
    if mode == "top_k":
        return dynmoe.TopK(routing["k"], renormalize=routing.get("renormalize"))
    if mode == "top_p":
        return dynmoe.TopP(routing["threshold"], min_experts=routing.get("min_experts"),
                           max_experts=routing.get("max_experts"), renormalize=routing.get("renormalize"))
    raise AssertionError(f"unknown routing mode {mode!r}")


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def assert_logits_close(actual, expected, tolerance: dict | None = None, what: str = "logits"):
    tolerance = tolerance or {"logits_rel_l2": 1e-4, "logits_max_abs": 1e-3}
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_l2(actual, expected)
    max_abs = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    assert err <= tolerance["logits_rel_l2"], f"{what}: relative L2 error {err:.3g}"
    assert max_abs <= tolerance["logits_max_abs"], f"{what}: max abs error {max_abs:.3g}"


def assert_stats_match(stats: "dynmoe.Stats", expected: dict, what: str):
    """Compares a Stats snapshot with a reference.json `stats` entry."""
    assert [layer.layer for layer in stats.moe_layers] == expected["moe_layers"], what
    for layer in expected["moe_layers"]:
        want = expected["per_layer"][str(layer)]
        got = stats.layers[layer]
        assert got.is_moe
        np.testing.assert_array_equal(got.expert_token_counts, want["expert_token_counts"],
                                      err_msg=f"{what}: layer {layer} expert_token_counts")
        np.testing.assert_array_equal(got.experts_per_token_histogram, want["experts_per_token_histogram"],
                                      err_msg=f"{what}: layer {layer} experts_per_token_histogram")
        assert abs(got.mean_experts_per_token - want["mean_experts_per_token"]) <= 1e-6, what
    assert abs(stats.mean_experts_per_token - expected["mean_experts_per_token"]) <= 1e-6, what


# --------------------------------------------------------------------------------------------
# pytest fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models():
    """Loads each fixture's model once: ``models(name) -> dynmoe.Model``."""
    loaded: dict[str, dynmoe.Model] = {}

    def get(name: str) -> dynmoe.Model:
        if name not in loaded:
            loaded[name] = dynmoe.Model(reference(name).model_dir)
        return loaded[name]

    yield get
    for model in loaded.values():
        model.close()


@pytest.fixture
def mixtral(models):
    """The mixtral-tiny model with freshly reset statistics."""
    model = models("mixtral-tiny")
    model.reset_stats()
    return model
