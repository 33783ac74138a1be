#!/usr/bin/env python3
"""Writes Tests/References/qwen2moe-sliding-window.json: the logits Hugging Face transformers
computes for the qwen2moe-tiny fixture's checkpoint with a sliding window on some of its layers,
chosen two ways: by transformers' rule for configs without `layer_types` (the even layers below
`max_window_layers`) and by an explicit `layer_types` list. dynmoe must window exactly the layers
transformers windows.

The output is committed; this script is how it was made (it is not run by `make test`).
Requires torch and transformers 5 (5.23.0 was used, the version the fixtures were made with):

    python3 Tests/References/make_qwen2moe_sliding_window.py

Before writing anything it checks its own setup: the unmodified checkpoint must reproduce the
fixture's reference logits, and each windowed variant must change them.
"""
import json
import os
import shutil
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "Fixtures", "qwen2moe-tiny")
WINDOW = 4
VARIANTS = {
    # No layer_types: transformers windows layer i when i is even and i < max_window_layers.
    "rule": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2, "layer_types": None},
    "layer_types": {"use_sliding_window": True, "sliding_window": WINDOW,
                    "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
}


def logits_for(overrides, input_ids):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(FIXTURE, "model"), tmp, dirs_exist_ok=True)
        path = os.path.join(tmp, "config.json")
        with open(path) as f:
            config = json.load(f)
        for key, value in overrides.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        with open(path, "w") as f:
            json.dump(config, f)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        with torch.no_grad():
            return model(torch.tensor(input_ids)).logits.float().numpy(), model.config.layer_types


def main():
    with open(os.path.join(FIXTURE, "reference.json")) as f:
        reference = json.load(f)
    input_ids = reference["input_ids"]
    full, _ = logits_for({}, input_ids)
    expected = load_file(os.path.join(FIXTURE, "reference.safetensors"))["native.logits"].reshape(full.shape)
    assert np.abs(full - expected).max() < 1e-4, "setup does not reproduce the fixture's reference"

    variants = {}
    for name, overrides in VARIANTS.items():
        windowed, layer_types = logits_for(overrides, input_ids)
        assert np.abs(windowed - full).max() > 1e-3, f"{name}: the window changes nothing: not a useful check"
        variants[name] = {"config_overrides": overrides, "layer_types_used": list(layer_types),
                          "logits": [float(x) for x in windowed.reshape(-1)]}
    out = {
        "oracle": f"transformers {transformers.__version__} Qwen2MoeForCausalLM (eager attention), torch {torch.__version__}",
        "fixture": "qwen2moe-tiny",
        "input_ids": input_ids,
        "logits_shape": list(full.shape),
        "variants": variants,
        "tolerance": reference["tolerance"],
    }
    with open(os.path.join(HERE, "qwen2moe-sliding-window.json"), "w") as f:
        json.dump(out, f)
        f.write("\n")
    print("wrote qwen2moe-sliding-window.json:", {n: v["layer_types_used"] for n, v in variants.items()})


if __name__ == "__main__":
    main()
