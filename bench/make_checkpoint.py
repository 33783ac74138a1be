#!/usr/bin/env python3
"""Write a random-weight MoE checkpoint in Hugging Face layout, for benchmarking dynmoe.

The checkpoint is a directory with config.json, sharded safetensors files
(model-0000N-of-0000M.safetensors, each at most --shard-bytes) and
model.safetensors.index.json, exactly as `save_pretrained` lays them out. Only numpy is needed:
the safetensors files are written by a small writer below (8-byte little-endian header length,
JSON header with dtype/shape/data_offsets padded with spaces to a multiple of 8 bytes, then the
tensors' bytes). Tensors are generated and written one at a time, so memory stays at the size of
the largest tensor however big the checkpoint is.

Weights are deterministic: every tensor has its own generator seeded from (--seed, tensor name),
so the same seed gives byte-identical files. The initialisation is chosen so that routing looks
like a trained model's -- peaked for each token, balanced across tokens:
  - norms are 1; q/k/v, gate and up projections and the LM head are N(0, 0.02);
  - the residual-branch outputs (o_proj, down_proj) are N(0, 0.02 / sqrt(2 x layers)), the
    GPT-2 / Megatron scaled initialisation;
  - the embedding table is N(0, --embed-std = 1.0). With random weights, attention averages
    values over positions and adds a component common to all tokens to the residual stream; with
    the usual 0.02 embeddings that component dominates after one layer, every token then picks
    the same experts (one expert receiving all 128 tokens of a prompt, a third of the experts
    never used) and prefill would look unrealistically cheap. With embeddings of std 1 and the
    scaled residual init, the load over experts is as even as chance allows (coefficient of
    variation ~0.25 over 128 tokens in every layer);
  - router weights are N(0, --router-logit-std / sqrt(hidden)), so that router logits have a
    standard deviation of about 2 (the router's input is RMS-normalised): with 64 experts, top-p
    0.4 / 0.6 / 0.8 keeps about 2.6 / 5 / 11 experts per token (a std of 0.5 per *weight* would
    make logits of std 16, i.e. top-1 routing at every threshold).

Presets (--tiny gives a small variant of each for smoke tests, written in a second or so):
  qwen3moe  Qwen3MoeForCausalLM, hidden 1024, 16 layers, 64 experts top-8 (moe_intermediate 512),
            16 q / 4 kv heads of 64, vocab 32000, bf16: ~1.72 B parameters, ~277 M activated per
            token (without the embedding table), ~3.4 GB on disk.
  paper     the Dynamic-MoE paper's MoEForCausalLM (model_type llama), hidden 1024, 16 layers,
            16 experts of intermediate 2048, every layer MoE (expert_frequency 1), native routing
            top-p 0.4, bf16: ~1.75 B parameters, ~3.5 GB.

Usage:
  python3 bench/make_checkpoint.py --preset qwen3moe --out bench/out/qwen3moe-1.7b [--seed 0]
  python3 bench/make_checkpoint.py --preset paper --tiny --out /tmp/paper-tiny

If --out already holds a complete checkpoint generated with the same config, seed and generator
version, nothing is written (a message says so). Generation goes to a temporary directory that
is renamed into place at the end, so an interrupted run never leaves a half-written checkpoint.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib

import numpy as np

GENERATOR_VERSION = 2
MARKER = "bench-checkpoint.json"
DEFAULT_SHARD_BYTES = 2 * 1000**3


# --------------------------------------------------------------------------------------------
# Configurations


def qwen3moe_config(tiny):
    c = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_sparse_step": 1,
        "dtype": "bfloat16",
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 4096,
        "mlp_only_layers": [],
        "moe_intermediate_size": 512,
        "norm_topk_prob": True,
        "num_attention_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 16,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 32000,
    }
    if tiny:
        c.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=768, moe_intermediate_size=128, vocab_size=4096, max_position_embeddings=1024)
    return c


def paper_config(tiny):
    c = {
        "architectures": ["MoEForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "expert_frequency": 1,
        "experts_topk": 2,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 2048,
        "max_position_embeddings": 4096,
        "num_attention_heads": 16,
        "num_experts": 16,
        "num_hidden_layers": 16,
        "num_key_value_heads": 16,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "top_p_threshold": 0.4,
        "use_cache": True,
        "vocab_size": 32000,
    }
    if tiny:
        c.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512, vocab_size=4096, max_position_embeddings=1024)
    return c


PRESETS = {"qwen3moe": qwen3moe_config, "paper": paper_config}


# --------------------------------------------------------------------------------------------
# Tensor list: (name, shape, kind) with kind in {"weight", "norm", "router"}


def tensor_specs(config):
    h = config["hidden_size"]
    n_layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or h // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    n_experts = config["num_experts"]
    paper = config["architectures"] == ["MoEForCausalLM"]
    if paper:
        expert_width = dense_width = config["intermediate_size"]
        freq = config.get("expert_frequency", 1)
        is_moe = [i % freq == 0 for i in range(n_layers)]
        in_norm, post_norm, router, dense = "input_norm", "post_attention_norm", "mlp.router", "mlp.mlp"
    else:
        expert_width, dense_width = config["moe_intermediate_size"], config["intermediate_size"]
        step = config.get("decoder_sparse_step", 1)
        only = set(config.get("mlp_only_layers") or [])
        is_moe = [(i not in only) and (i + 1) % step == 0 for i in range(n_layers)]
        in_norm, post_norm, router, dense = "input_layernorm", "post_attention_layernorm", "mlp.gate", "mlp"

    specs = [("model.embed_tokens.weight", (config["vocab_size"], h), "weight")]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs.append((p + in_norm + ".weight", (h,), "norm"))
        specs += [
            (p + "self_attn.q_proj.weight", (q_dim, h), "weight"),
            (p + "self_attn.k_proj.weight", (kv_dim, h), "weight"),
            (p + "self_attn.v_proj.weight", (kv_dim, h), "weight"),
            (p + "self_attn.o_proj.weight", (h, q_dim), "weight"),
        ]
        if not paper:
            specs += [(p + "self_attn.q_norm.weight", (head_dim,), "norm"),
                      (p + "self_attn.k_norm.weight", (head_dim,), "norm")]
        specs.append((p + post_norm + ".weight", (h,), "norm"))
        if is_moe[i]:
            specs.append((p + router + ".weight", (n_experts, h), "router"))
            for e in range(n_experts):
                q = p + f"mlp.experts.{e}."
                specs += [(q + "gate_proj.weight", (expert_width, h), "weight"),
                          (q + "up_proj.weight", (expert_width, h), "weight"),
                          (q + "down_proj.weight", (h, expert_width), "weight")]
        else:
            q = p + dense + "."
            specs += [(q + "gate_proj.weight", (dense_width, h), "weight"),
                      (q + "up_proj.weight", (dense_width, h), "weight"),
                      (q + "down_proj.weight", (h, dense_width), "weight")]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (config["vocab_size"], h), "weight"))
    return specs


# --------------------------------------------------------------------------------------------
# Data


def to_bf16_bits(x):
    """float32 array -> uint16 bf16 bit patterns, round to nearest even (inputs are finite)."""
    u = x.view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def weight_std(name, kind, config, init):
    """Standard deviation of a random tensor (see the module docstring)."""
    if kind == "router":
        return init["router_logit_std"] / math.sqrt(config["hidden_size"])
    if name == "model.embed_tokens.weight":
        return init["embed_std"]
    if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
        return config["initializer_range"] / math.sqrt(2 * config["num_hidden_layers"])
    return config["initializer_range"]


def tensor_bytes(name, shape, kind, config, seed, dtype, init):
    if kind == "norm":
        x = np.ones(shape, dtype=np.float32)
    else:
        ss = np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(name.encode()),))
        rng = np.random.default_rng(ss)
        std = weight_std(name, kind, config, init)
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(std)
    if dtype == "BF16":
        return to_bf16_bits(x).tobytes()
    return x.tobytes()


ITEM_SIZE = {"BF16": 2, "F32": 4}


def plan_shards(specs, item, shard_bytes):
    shards, current, size = [], [], 0
    for spec in specs:
        n = item * math.prod(spec[1])
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
    if current:
        shards.append(current)
    return shards


def write_shard(path, specs, config, seed, dtype, init, progress):
    item = ITEM_SIZE[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in specs:
        n = item * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, kind in specs:
            data = tensor_bytes(name, shape, kind, config, seed, dtype, init)
            f.write(data)
            progress(len(data))
    return offset


def describe(config, specs):
    total = sum(math.prod(s) for _, s, _ in specs)
    n_experts = config["num_experts"]
    expert = sum(math.prod(s) for n, s, _ in specs if ".experts.0." in n and n.startswith("model.layers.0."))
    moe_layers = sum(1 for n, _, k in specs if k == "router")
    embed = config["vocab_size"] * config["hidden_size"]
    routed = expert * n_experts * moe_layers
    always = total - routed - embed
    k = config.get("num_experts_per_tok") or config.get("experts_topk")
    return total, always + k * expert * moe_layers, k


def generate(config, out, seed, dtype, init, shard_bytes, quiet=False):
    specs = tensor_specs(config)
    item = ITEM_SIZE[dtype]
    shards = plan_shards(specs, item, shard_bytes)
    total_bytes = sum(item * math.prod(s) for _, s, _ in specs)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    written, start, last = [0], time.time(), [0.0]

    def progress(n):
        written[0] += n
        now = time.time()
        if not quiet and (now - last[0] > 2 or written[0] == total_bytes):
            last[0] = now
            print(f"\r  {written[0] / 1e9:6.2f} / {total_bytes / 1e9:.2f} GB  ({now - start:5.1f} s)",
                  end="", file=sys.stderr, flush=True)

    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(tmp, fname), shard, config, seed, dtype, init, progress)
        for name, _, _ in shard:
            weight_map[name] = fname
    if not quiet:
        print(file=sys.stderr)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return tmp, len(shards), total_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3moe")
    ap.add_argument("--tiny", action="store_true", help="small variant for smoke tests (hidden 256, 4 layers)")
    ap.add_argument("--out", help="output directory (default bench/out/<preset>[-tiny])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--router-logit-std", type=float, default=2.0,
                    help="standard deviation of router logits (router weight std = this / sqrt(hidden))")
    ap.add_argument("--embed-std", type=float, default=1.0, help="standard deviation of the embedding table")
    ap.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="maximum bytes per shard")
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching checkpoint exists")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    config = PRESETS[args.preset](args.tiny)
    dtype = {"bf16": "BF16", "f32": "F32"}[args.dtype]
    config["dtype"] = "bfloat16" if dtype == "BF16" else "float32"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                   args.preset + ("-tiny" if args.tiny else ""))
    init = {"router_logit_std": args.router_logit_std, "embed_std": args.embed_std}
    marker = {
        "generator": "bench/make_checkpoint.py",
        "generator_version": GENERATOR_VERSION,
        "preset": args.preset,
        "tiny": args.tiny,
        "seed": args.seed,
        "dtype": dtype,
        "init": init,
        "shard_bytes": args.shard_bytes,
        "config": config,
    }
    specs = tensor_specs(config)
    total, active, k = describe(config, specs)
    marker_path = os.path.join(out, MARKER)
    if not args.force and os.path.exists(marker_path):
        try:
            with open(marker_path) as f:
                existing = json.load(f)
        except (OSError, ValueError):
            existing = None
        if existing == marker:
            print(f"{out}: checkpoint already exists with a matching config (seed {args.seed}); not regenerating")
            return 0
        print(f"{out}: existing checkpoint does not match; regenerating", file=sys.stderr)

    print(f"writing {args.preset}{' (tiny)' if args.tiny else ''} to {out}: {total / 1e9:.3f} B parameters, "
          f"{active / 1e6:.1f} M activated per token with {k} experts (without embeddings), {dtype}",
          file=sys.stderr)
    t0 = time.time()
    tmp, n_shards, total_bytes = generate(config, out, args.seed, dtype, init, args.shard_bytes, args.quiet)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(marker, f, indent=2, sort_keys=True)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.rename(tmp, out)
    print(f"{out}: {n_shards} shard(s), {total_bytes / 1e9:.2f} GB in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
