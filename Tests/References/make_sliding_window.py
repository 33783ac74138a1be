#!/usr/bin/env python3
"""Writes Tests/References/mixtral-sliding-window.json: the logits Hugging Face transformers
computes for the mixtral-tiny fixture's checkpoint with `sliding_window` set to 4 (the fixture
itself has none), so dynmoe's sliding-window attention is checked against the oracle.

The output is committed; this script is how it was made (it is not run by `make test`).
Requires torch and transformers (4.57 was used; rope_theta is passed explicitly because 4.x reads
it from the top level, while the fixture's config carries it in rope_parameters):

    python3 Tests/References/make_sliding_window.py

Before writing anything it checks its own setup: the same model without a window must reproduce
the fixture's reference logits (computed by transformers 5.23).
"""
import json
import os

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "Fixtures", "mixtral-tiny")
WINDOW = 4


def logits_for(config_dict, window, state, input_ids):
    cfg = dict(config_dict)
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg["sliding_window"] = window
    cfg["_attn_implementation"] = "eager"
    config = transformers.MixtralConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype")})
    config._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        return model(torch.tensor(input_ids)).logits.float().numpy()


def main():
    with open(os.path.join(FIXTURE, "model", "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(FIXTURE, "reference.json")) as f:
        reference = json.load(f)
    state = load_file(os.path.join(FIXTURE, "model", "model.safetensors"))
    input_ids = reference["input_ids"]

    full = logits_for(config, None, state, input_ids)
    expected = load_file(os.path.join(FIXTURE, "reference.safetensors"))["native.logits"].reshape(full.shape)
    assert np.abs(full - expected).max() < 1e-4, "setup does not reproduce the fixture's reference"

    windowed = logits_for(config, WINDOW, state, input_ids)
    assert np.abs(windowed - full).max() > 1e-3, "the window changes nothing: not a useful check"
    out = {
        "oracle": f"transformers {transformers.__version__} MixtralForCausalLM (eager attention), torch {torch.__version__}",
        "fixture": "mixtral-tiny",
        "config_overrides": {"sliding_window": WINDOW},
        "input_ids": input_ids,
        "logits_shape": list(windowed.shape),
        "logits": [float(x) for x in windowed.reshape(-1)],
        "tolerance": reference["tolerance"],
    }
    with open(os.path.join(HERE, "mixtral-sliding-window.json"), "w") as f:
        json.dump(out, f)
        f.write("\n")
    print("wrote mixtral-sliding-window.json; max |windowed - full| =", float(np.abs(windowed - full).max()))


if __name__ == "__main__":
    main()
