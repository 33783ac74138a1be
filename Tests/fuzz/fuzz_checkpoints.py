#!/usr/bin/env python3
"""Fuzz libdynmoe's checkpoint loader and C API.

Each checkpoint case copies one of the shared fixtures (Tests/Fixtures/<name>/model) into a
temporary directory, mutates it (see MUTATORS below and Tests/fuzz/README.md) and loads it in a
subprocess with build/bin/fuzz_load_driver, which runs a short forward, session eval and
generation when the load succeeds. API cases run build/bin/fuzz_api_driver, which makes a seeded
random sequence of C API calls with edge-case arguments and checks the error contract.

A case passes when the subprocess ends in a clean success or a clean error (a known status with
a message). It fails on a crash (signal or unexpected exit), a hang (timeout) or a contract
violation reported by a driver (unknown status, DYNMOE_ERR_INTERNAL, empty last_error, out
handle not reset, output buffer written by a failed call...).

    python3 Tests/fuzz/fuzz_checkpoints.py --cases 1000 --seed 1     # quick, a few minutes
    python3 Tests/fuzz/fuzz_checkpoints.py --cases 10000 --seed 1    # long run

Prints per-category counts, the failures (with the mutation that caused them) and, last,
"N passed, M failed". Exit status 1 if any case failed.

Standard library + numpy only.
"""

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES_DIR = os.path.join(ROOT, "Tests", "Fixtures")
FIXTURES = ["dynamic-moe-tiny", "mixtral-tiny", "olmoe-tiny", "qwen2moe-tiny", "qwen3moe-tiny-bf16",
            # Derived from a fixture (see derive_fixture): the same weights in another layout.
            "mixtral-tiny+fused", "qwen3moe-tiny-bf16+fused", "qwen3moe-tiny-bf16+f16"]
LIB_DIR = os.path.join(ROOT, "build", "lib")
BIN_DIR = os.path.join(ROOT, "build", "bin")
LOAD_DRIVER = os.path.join(BIN_DIR, "fuzz_load_driver")
API_DRIVER = os.path.join(BIN_DIR, "fuzz_api_driver")

STATUS_NAMES = ["DYNMOE_OK", "DYNMOE_ERR_INVALID_ARGUMENT", "DYNMOE_ERR_IO", "DYNMOE_ERR_FORMAT",
                "DYNMOE_ERR_UNSUPPORTED", "DYNMOE_ERR_BUFFER_TOO_SMALL", "DYNMOE_ERR_OUT_OF_MEMORY",
                "DYNMOE_ERR_CONTEXT_FULL", "DYNMOE_ERR_BUSY", "DYNMOE_ERR_NOT_AVAILABLE", "DYNMOE_ERR_INTERNAL"]

# ------------------------------------------------------------------------------------------------
# Building the drivers
# ------------------------------------------------------------------------------------------------


def build_drivers(force=False):
    lib = os.path.join(LIB_DIR, "libdynmoe.so")
    if not os.path.exists(lib):
        sys.exit(f"error: {lib} not found; run `make lib` first")
    os.makedirs(BIN_DIR, exist_ok=True)
    for source, binary in (("load_driver.c", LOAD_DRIVER), ("api_driver.c", API_DRIVER)):
        src = os.path.join(ROOT, "Tests", "fuzz", source)
        if (not force and os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(src)
                and os.path.getmtime(binary) >= os.path.getmtime(lib)):
            continue
        cmd = [os.environ.get("CC", "cc"), "-std=c99", "-O1", "-g", "-I" + os.path.join(ROOT, "include"), src,
               "-L" + LIB_DIR, "-ldynmoe", "-Wl,-rpath," + LIB_DIR, "-lm", "-o", binary]
        print("building:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------------------
# Fixture access
# ------------------------------------------------------------------------------------------------

_fixture_cache = {}


class SafeTensors:
    """A parsed safetensors file: header dict (ordered), data section bytes."""

    def __init__(self, raw):
        self.raw = raw
        (self.header_len,) = struct.unpack("<Q", raw[:8])
        self.header = json.loads(raw[8:8 + self.header_len])
        self.data_start = 8 + self.header_len
        self.data = raw[self.data_start:]

    def tensor_names(self):
        return [k for k in self.header if k != "__metadata__"]


def derive_fixture(name, directory):
    """Writes fixture `base+variant` into `directory`: one model.safetensors holding the base
    fixture's tensors with the routed experts fused as transformers 5 stores them ("fused":
    mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]) or every BF16 tensor
    converted to F16 ("f16"), so the fuzzer also mutates the loader's other layouts."""
    base, variant = name.split("+")
    fx = fixture(base)
    tensors = {}  # name -> (dtype, shape, bytes)
    for st in fx["st"].values():
        for n in st.tensor_names():
            e = st.header[n]
            b, c = e["data_offsets"]
            tensors[n] = (e["dtype"], e["shape"], st.data[b:c])
    if variant == "f16":
        for n, (dtype, shape, data) in list(tensors.items()):
            if dtype == "BF16":
                f32 = (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
                tensors[n] = ("F16", shape, f32.astype(np.float16).tobytes())
    elif variant == "fused":
        mixtral = base.startswith("mixtral")
        block, parts = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", ("gate_proj", "up_proj", "down_proj"))
        pattern = re.compile(r"model\.layers\.(\d+)\.%s\.experts\.(\d+)\.%s\.weight" % (re.escape(block), parts[0]))
        layers = sorted({int(m.group(1)) for m in map(pattern.fullmatch, tensors) if m})
        for l in layers:
            old, new = f"model.layers.{l}.{block}", f"model.layers.{l}.mlp"
            e, gate_up, down = 0, [], []
            while f"{old}.experts.{e}.{parts[0]}.weight" in tensors:
                g, u, d = (tensors.pop(f"{old}.experts.{e}.{p}.weight") for p in parts)
                gate_up += [g[2], u[2]]
                down.append(d[2])
                width, hidden, dtype = g[1][0], g[1][1], g[0]
                e += 1
            tensors[f"{new}.experts.gate_up_proj"] = (dtype, [e, 2 * width, hidden], b"".join(gate_up))
            tensors[f"{new}.experts.down_proj"] = (dtype, [e, hidden, width], b"".join(down))
            tensors[f"{new}.gate.weight"] = tensors.pop(f"{old}.gate.weight")
    else:
        raise ValueError(name)
    header, offset, chunks = {"__metadata__": {"format": "pt"}}, 0, []
    for n in sorted(tensors):
        dtype, shape, data = tensors[n]
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "wb") as fh:
        fh.write(fx["files"]["config.json"])
    with open(os.path.join(directory, "model.safetensors"), "wb") as fh:
        fh.write(encode_safetensors(header, b"".join(chunks)))


def fixture(name):
    """{'dir', 'files': {name: bytes}, 'st': {name: SafeTensors}} of one fixture, cached."""
    if name not in _fixture_cache:
        d = os.path.join(FIXTURES_DIR, name, "model")
        if "+" in name:
            d = os.path.join(_options.get("derived") or tempfile.gettempdir(), name)
            if not os.path.exists(os.path.join(d, "model.safetensors")):
                derive_fixture(name, d)
        files = {}
        for f in sorted(os.listdir(d)):
            with open(os.path.join(d, f), "rb") as fh:
                files[f] = fh.read()
        st = {f: SafeTensors(b) for f, b in files.items() if f.endswith(".safetensors")}
        _fixture_cache[name] = {"dir": d, "files": files, "st": st}
    return _fixture_cache[name]


def encode_safetensors(header, data, pad=0, length_override=None):
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    n = len(text) if length_override is None else length_override
    return struct.pack("<Q", n) + text + data


def relayout(header, names, data_of):
    """A contiguous layout of `names` (in that order) with the given per-tensor bytes."""
    out_header = {}
    if "__metadata__" in header:
        out_header["__metadata__"] = header["__metadata__"]
    chunks, offset = [], 0
    for n in names:
        b = data_of(n)
        e = dict(header[n])
        e["data_offsets"] = [offset, offset + len(b)]
        out_header[n] = e
        chunks.append(b)
        offset += len(b)
    return out_header, b"".join(chunks)


# ------------------------------------------------------------------------------------------------
# Random values
# ------------------------------------------------------------------------------------------------

HUGE_INTS = [2**31 - 1, 2**31, 2**32, 2**39, 2**40 - 1, 2**40, 2**53, 2**63 - 1, 2**63, 2**64, 10**30]
DTYPES_VALID = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]
DTYPES_OTHER = ["F8_E4M3", "F8_E5M2", "F4", "C64", "f32", "", "F32 ", "Q4_0", "\u00e9", "F" * 300]


def random_string(rng, n=None):
    n = rng.randint(0, 12) if n is None else n
    alphabet = "abcxyz._-0123456789 \"\\/\u00e9\u4e2d\n\t"
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_scalar(rng):
    return rng.choice([
        lambda: None, lambda: True, lambda: False, lambda: 0, lambda: -1, lambda: 1,
        lambda: rng.randint(-1000, 1000), lambda: rng.choice(HUGE_INTS), lambda: -rng.choice(HUGE_INTS),
        lambda: rng.uniform(-1e3, 1e3), lambda: float("nan"), lambda: float("inf"), lambda: float("-inf"),
        lambda: 1e300, lambda: 0.5, lambda: random_string(rng),
    ])()


def random_json(rng, depth=0):
    r = rng.random()
    if depth >= 4 or r < 0.45:
        return random_scalar(rng)
    if r < 0.7:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["dtype", "shape", "data_offsets", "__metadata__", "model.norm.weight", random_string(rng)]
    return {rng.choice(keys) + ("" if rng.random() < 0.7 else str(i)): random_json(rng, depth + 1)
            for i in range(rng.randint(0, 4))}


def random_int_value(rng, original=None):
    """An integer-ish replacement for a numeric config field."""
    choices = [0, -1, -2**31, rng.randint(-100, -1), 1, 2, 3, rng.randint(1, 300), rng.choice(HUGE_INTS),
               rng.choice(HUGE_INTS), 1.5, 0.5, 1e300, -1e300, float("nan"), float("inf"), "32", "", True, False,
               None, [], {}, [1, 2]]
    if isinstance(original, int) and not isinstance(original, bool):
        choices += [original + 1, original - 1, original * 2, original // 2, original + 0.5, float(original),
                    str(original), -original]
    return rng.choice(choices)


# ------------------------------------------------------------------------------------------------
# Mutators: each takes (rng, fixture dict, out dir) and returns a description; files written into
# `out` replace the fixture's (the others are hard links, never written through).
# ------------------------------------------------------------------------------------------------


def write(out, name, data):
    path = os.path.join(out, name)
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)  # never write through a hard link to the fixture
    with open(path, "wb") as fh:
        fh.write(data)


def pick_st(rng, fx):
    name = rng.choice(sorted(fx["st"]))
    return name, fx["st"][name]


def m_truncate_boundary(rng, fx, out):
    name, st = pick_st(rng, fx)
    raw = st.raw
    points = set(range(0, 9)) | {st.data_start - 1, st.data_start, st.data_start + 1, 8 + st.header_len // 2}
    for n in st.tensor_names():
        b, e = st.header[n]["data_offsets"]
        points |= {st.data_start + b, st.data_start + e - 1, st.data_start + e + 1}
    points = sorted(p for p in points if 0 <= p < len(raw))
    cut = rng.choice(points)
    write(out, name, raw[:cut])
    return f"{name} truncated at byte {cut} of {len(raw)} (data starts at {st.data_start})"


def m_truncate_random(rng, fx, out):
    names = sorted(fx["files"])
    name = rng.choice(names)
    raw = fx["files"][name]
    cut = rng.randrange(0, len(raw))
    write(out, name, raw[:cut])
    return f"{name} truncated at byte {cut} of {len(raw)}"


def m_length_bitflip(rng, fx, out):
    name, st = pick_st(rng, fx)
    raw = bytearray(st.raw)
    if rng.random() < 0.6:
        bits = rng.sample(range(64), rng.randint(1, 3))
        for b in bits:
            raw[b // 8] ^= 1 << (b % 8)
        what = f"bits {bits}"
    else:
        n = st.header_len
        value = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(raw) - 8, len(raw) - 7, len(raw), 100 << 20,
                            (100 << 20) + 1, 2**32, 2**63, 2**64 - 1, 2**63 - 1])
        raw[:8] = struct.pack("<Q", value)
        what = f"value {value}"
    write(out, name, bytes(raw))
    return f"{name}: header length {what} (was {st.header_len})"


def m_header_bitflip(rng, fx, out):
    name, st = pick_st(rng, fx)
    raw = bytearray(st.raw)
    k = rng.randint(1, 6)
    where = []
    for _ in range(k):
        i = rng.randrange(8, st.data_start)
        if rng.random() < 0.5:
            raw[i] ^= 1 << rng.randrange(8)
        else:
            raw[i] = ord(rng.choice('{}[]":,\\0-9e.Nn \x00\xff'))
        where.append(i)
    write(out, name, bytes(raw))
    return f"{name}: header bytes changed at {where}"


def m_header_structure(rng, fx, out):
    name, st = pick_st(rng, fx)
    header = json.loads(json.dumps(st.header))
    names = st.tensor_names()
    data = st.data
    victim = rng.choice(names)
    kind = rng.randrange(13)
    pad = 0
    if kind == 0:
        del header[victim]
        what = f"removed entry {victim}"
    elif kind == 1:
        header[random_string(rng) or "x"] = {"dtype": rng.choice(DTYPES_VALID + DTYPES_OTHER),
                                               "shape": [rng.randint(0, 4) for _ in range(rng.randint(0, 3))],
                                               "data_offsets": [rng.randint(0, len(data)), rng.randint(0, len(data))]}
        what = "added a random tensor entry"
    elif kind == 2:
        header[victim]["dtype"] = rng.choice(DTYPES_VALID + DTYPES_OTHER + [None, 4, ["F32"], {"a": 1}])
        what = f"{victim}.dtype = {header[victim]['dtype']!r}"
    elif kind == 3:
        shape = header[victim]["shape"]
        choice = rng.randrange(6)
        if choice == 0:
            shape = list(reversed(shape))
        elif choice == 1:
            shape = shape + [1]
        elif choice == 2:
            shape = shape[:-1]
        elif choice == 3:
            shape = [random_int_value(rng, d) for d in shape]
        elif choice == 4:
            shape = random_json(rng)
        else:
            shape = [0] + shape
        header[victim]["shape"] = shape
        what = f"{victim}.shape = {shape!r}"[:200]
    elif kind == 4:
        b, e = header[victim]["data_offsets"]
        off = rng.choice([[e, b], [b, e + 1], [b - 1, e], [b + 1, e + 1], [-1, e], [b, len(data) + 1],
                          [b, 2**63], [b, 2**64], [0, 0], [b], [b, e, e], [], [float(b), float(e)], [str(b), e],
                          [b + 0.5, e], None, {"0": b}])
        header[victim]["data_offsets"] = off
        what = f"{victim}.data_offsets = {off!r}"
    elif kind == 5:
        header[victim] = random_scalar(rng) if rng.random() < 0.5 else [1, 2]
        what = f"{victim} entry = {header[victim]!r}"
    elif kind == 6:
        header["__metadata__"] = rng.choice([None, 1, "x", [], {"format": 1}, {"a": {"b": 1}}, {"format": "pt", "k": "v"}])
        what = f"__metadata__ = {header['__metadata__']!r}"
    elif kind == 7:
        new = rng.choice([victim + "x", victim.replace("layers.0", "layers.9"), victim.upper(), "", victim + "\u0000"])
        header = {(new if k == victim else k): v for k, v in header.items()}
        what = f"renamed {victim} -> {new!r}"
    elif kind == 8:
        header = random_json(rng)
        what = f"header replaced by random JSON {json.dumps(header)[:120]}"
    elif kind == 9:
        # duplicate key: serialise by hand
        entry = json.dumps(st.header[victim], separators=(",", ":"))
        text = json.dumps(st.header, separators=(",", ":"))
        text = text[:-1] + f',"{victim}":{entry}}}'
        write(out, name, struct.pack("<Q", len(text.encode())) + text.encode() + data)
        return f"{name}: duplicate key {victim}"
    elif kind == 10:
        depth = rng.choice([100, 127, 128, 129, 1000, 100000])
        text = ("[" * depth + "]" * depth).encode()
        write(out, name, struct.pack("<Q", len(text)) + text + data)
        return f"{name}: header is {depth} nested arrays"
    elif kind == 11:
        pad = rng.choice([1, 7, 4096, 1 << 20])
        what = f"header padded with {pad} spaces (valid)"
    else:
        raw = bytearray(json.dumps(st.header, separators=(",", ":")).encode())
        i = rng.randrange(len(raw))
        raw[i:i] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\x00", b"\x1f"])
        write(out, name, struct.pack("<Q", len(raw)) + bytes(raw) + data)
        return f"{name}: invalid bytes inserted in the header at {i}"
    write(out, name, encode_safetensors(header, data, pad=pad))
    return f"{name}: {what}"


def m_offsets(rng, fx, out):
    name, st = pick_st(rng, fx)
    header = json.loads(json.dumps(st.header))
    names = st.tensor_names()
    kind = rng.randrange(6)
    if kind == 0:
        # permute the offsets among all tensors
        offs = [header[n]["data_offsets"] for n in names]
        rng.shuffle(offs)
        for n, o in zip(names, offs):
            header[n]["data_offsets"] = o
        what = "data_offsets shuffled among all tensors"
    elif kind == 1:
        # permute among tensors of one byte size (sizes stay consistent: should load)
        by_size = defaultdict(list)
        for n in names:
            b, e = header[n]["data_offsets"]
            by_size[e - b].append(n)
        group = max(by_size.values(), key=len)
        offs = [header[n]["data_offsets"] for n in group]
        rng.shuffle(offs)
        for n, o in zip(group, offs):
            header[n]["data_offsets"] = o
        what = f"data_offsets shuffled among {len(group)} same-size tensors (valid)"
    elif kind == 2:
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
        what = f"{a} given the offsets of {b} (overlap)"
    elif kind == 3:
        a = rng.choice(names)
        d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
        header[a]["data_offsets"] = [x + d for x in header[a]["data_offsets"]]
        what = f"{a} shifted by {d} bytes"
    elif kind == 4:
        # contiguous layout in reversed / random order (valid)
        order = list(names)
        rng.shuffle(order)

        def data_of(n):
            b, e = st.header[n]["data_offsets"]
            return st.data[b:e]

        header, data = relayout(st.header, order, data_of)
        write(out, name, encode_safetensors(header, data))
        return f"{name}: data re-laid out in random order (valid)"
    else:
        # trailing garbage / missing tail
        data = st.data + b"\0" * rng.choice([1, 4, 64]) if rng.random() < 0.5 else st.data[:-rng.choice([1, 4])]
        write(out, name, encode_safetensors(header, data))
        return f"{name}: data section resized to {len(data)} (was {len(st.data)})"
    write(out, name, encode_safetensors(header, st.data))
    return f"{name}: {what}"


CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
               "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
               "num_local_experts", "num_experts_per_tok", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_parameters", "rope_scaling", "top_p_threshold", "expert_frequency", "decoder_sparse_step",
               "mlp_only_layers", "norm_topk_prob", "tie_word_embeddings", "qkv_bias", "attention_bias", "clip_qkv",
               "sliding_window", "use_sliding_window", "architectures", "model_type", "bos_token_id", "eos_token_id"]


def mutate_config_value(rng, config, key):
    original = config.get(key)
    r = rng.random()
    if r < 0.15:
        config.pop(key, None)
        return f"deleted {key}"
    if key in ("rope_parameters", "rope_scaling"):
        value = rng.choice([None, 1, "default", [], {}, {"rope_type": "yarn", "factor": 4.0},
                            {"type": "linear", "factor": 2.0}, {"rope_type": 7}, {"rope_type": "default", "rope_theta": -1.0},
                            {"rope_type": "default", "rope_theta": "x"}, {"rope_type": "dynamic"}])
    elif key == "architectures":
        value = rng.choice([[], ["GPT2LMHeadModel"], "MixtralForCausalLM", [1], None,
                            ["MixtralForCausalLM", "Qwen2MoeForCausalLM"], [random_string(rng)],
                            ["OlmoeForCausalLM"], ["MoEForCausalLM"], ["Qwen3MoeForCausalLM"]])
    elif key == "model_type":
        value = rng.choice(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dynamic_moe", "llama", "", 3, None])
    elif key in ("mlp_only_layers",):
        value = rng.choice([[], [0], [0, 1, 2, 3], [-1], [2**40], ["1"], [1.5], 1, None, list(range(100))])
    elif key == "eos_token_id":
        value = rng.choice([[], [1, 2], [-1], [2**40], ["x"], 2**40, -5, 0, None])
    elif key in ("norm_topk_prob", "tie_word_embeddings", "qkv_bias", "attention_bias", "use_sliding_window"):
        value = rng.choice([True, False, 0, 1, "true", None, [], 2])
    elif key in ("rms_norm_eps", "rope_theta", "top_p_threshold", "clip_qkv"):
        value = rng.choice([0.0, -1.0, 1e-30, 1e-6, 0.5, 1.0, 1.0000001, 2.0, 1e300, float("nan"), float("inf"),
                            "0.5", None, 1, 0])
    else:
        value = random_int_value(rng, original)
    config[key] = value
    return f"{key}: {original!r} -> {value!r}"


SIZE_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
             "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
             "num_local_experts", "num_experts_per_tok", "max_position_embeddings", "expert_frequency",
             "decoder_sparse_step", "sliding_window", "bos_token_id"]


def config_key(rng, config):
    present = [k for k in CONFIG_KEYS if k in config]
    r = rng.random()
    if r < 0.7 and present:
        return rng.choice(present)
    if r < 0.9:
        return rng.choice(CONFIG_KEYS)
    return rng.choice(list(config) or CONFIG_KEYS)


def m_config(rng, fx, out):
    config = json.loads(fx["files"]["config.json"])
    kind = rng.random()
    if kind < 0.3:
        # boundary sweep of one size field: the values where limits and overflows live
        key = rng.choice([k for k in SIZE_KEYS if k in config or k == "head_dim"])
        original = config.get(key)
        base = original if isinstance(original, int) and not isinstance(original, bool) else 16
        value = rng.choice([0, -1, 1, base - 1, base + 1, 2 * base, 2**31 - 1, 2**31, 2**32, 2**35, 2**39,
                            2**40 - 1, 2**40, 2**53 + 1, 2**63 - 1, 2**64, 10**12, -2**40 + 1])
        config[key] = value
        write(out, "config.json", json.dumps(config, indent=1).encode())
        return f"config {key}: {original!r} -> {value!r} (size boundary)"
    if kind < 0.8:
        whats = [mutate_config_value(rng, config, config_key(rng, config)) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        write(out, "config.json", json.dumps(config, indent=1).encode())
        return "config " + "; ".join(whats)
    if kind < 0.88:
        value = random_json(rng)
        write(out, "config.json", json.dumps(value).encode())
        return f"config replaced by random JSON {json.dumps(value)[:100]}"
    raw = bytearray(fx["files"]["config.json"])
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(raw))
        raw[i] = ord(rng.choice('{}[]":,\\0-9e.N \x00\xff'))
    write(out, "config.json", bytes(raw))
    return "config.json bytes changed"


def m_data_poison(rng, fx, out):
    name, st = pick_st(rng, fx)
    names = st.tensor_names()
    victim = rng.choice(names)
    entry = st.header[victim]
    b, e = entry["data_offsets"]
    data = bytearray(st.data)
    count = (e - b) // {"F32": 4, "F16": 2, "BF16": 2}.get(entry["dtype"], 1)
    nprng = np.random.default_rng(rng.randrange(2**32))
    special = rng.choice(["nan", "inf", "huge", "random-bits", "zeros"])
    if special == "random-bits":
        chunk = nprng.integers(0, 256, size=e - b, dtype=np.uint8).tobytes()
    elif special == "zeros":
        chunk = bytes(e - b)
    else:
        v = {"nan": np.nan, "inf": np.inf, "huge": 3e38}[special]
        arr = np.full(count, v, dtype=np.float32)
        if entry["dtype"] == "F32":
            chunk = arr.tobytes()
        elif entry["dtype"] == "F16":
            with np.errstate(over="ignore"):  # "huge" becomes inf in f16, as intended
                chunk = arr.astype(np.float16).tobytes()
        else:  # BF16: top half of the f32 bits
            chunk = (arr.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    data[b:e] = chunk[: e - b]
    raw = st.raw[: st.data_start] + bytes(data)
    write(out, name, raw)
    return f"{name}: {victim} data set to {special}"


def m_index(rng, fx, out):
    index_name = "model.safetensors.index.json"
    if index_name in fx["files"]:
        index = json.loads(fx["files"][index_name])
    else:
        # make a (valid) index for a single-file checkpoint, then break it
        st = fx["st"]["model.safetensors"]
        index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in st.tensor_names()}}
    wm = index["weight_map"]
    names = sorted(wm)
    shards = sorted(set(wm.values()))
    kind = rng.randrange(10)
    victim = rng.choice(names)
    if kind == 0:
        shard = rng.choice(shards)
        os.unlink(os.path.join(out, shard))
        what = f"deleted shard {shard}"
    elif kind == 1:
        wm[victim] = rng.choice(["missing.safetensors", "../model.safetensors", "/etc/passwd", "", "a/b", ".", "..",
                                 "config.json", index_name, 5, None])
        what = f"weight_map[{victim}] = {wm[victim]!r}"
    elif kind == 2:
        others = [s for s in shards if s != wm[victim]]
        if others:
            wm[victim] = rng.choice(others)
            what = f"{victim} pointed at the wrong shard"
        else:
            wm[victim + ".bogus"] = shards[0]
            what = f"{victim}.bogus listed but not in the shard"
    elif kind == 3:
        wm["model.layers.0.bogus.weight"] = rng.choice(shards)
        what = "bogus tensor listed"
    elif kind == 4:
        del wm[victim]
        what = f"{victim} dropped from the weight_map"
    elif kind == 5:
        index["weight_map"] = rng.choice([None, [], "x", 1, {}])
        what = f"weight_map = {index['weight_map']!r}"
    elif kind == 6:
        del index["weight_map"]
        what = "no weight_map"
    elif kind == 7:
        index = random_json(rng)
        what = "index replaced by random JSON"
    elif kind == 8:
        text = json.dumps(index).encode()
        write(out, index_name, text[: rng.randrange(len(text))])
        return "index truncated"
    else:
        what = "index rewritten unchanged (valid)"
    write(out, index_name, json.dumps(index).encode())
    return what


def m_files(rng, fx, out):
    kind = rng.randrange(9)
    st_name = sorted(fx["st"])[0]
    target = rng.choice(["config.json", st_name])
    path = os.path.join(out, target)
    os.unlink(path)
    if kind == 0:
        return f"removed {target}"
    if kind == 1:
        write(out, target, b"")
        return f"{target} is empty"
    if kind == 2:
        os.mkdir(path)
        return f"{target} is a directory"
    if kind == 3:
        os.symlink("/dev/zero", path)
        return f"{target} -> /dev/zero"
    if kind == 4:
        os.symlink(target, path)
        return f"{target} is a symlink loop"
    if kind == 5:
        os.symlink("/nonexistent/x", path)
        return f"{target} is a dangling symlink"
    if kind == 6:
        os.mkfifo(path)
        return f"{target} is a FIFO (named pipe) with no writer"
    if kind == 7:
        shutil.copy(os.path.join(fx["dir"], target), path)
        os.chmod(path, 0)
        return f"{target} unreadable (mode 000; no effect as root)"
    os.symlink(os.path.join(fx["dir"], target), path)
    return f"{target} is a symlink to the fixture (valid)"


MUTATORS = {
    "truncate-boundary": (m_truncate_boundary, 10),
    "truncate-random": (m_truncate_random, 6),
    "length-bitflip": (m_length_bitflip, 8),
    "header-bitflip": (m_header_bitflip, 10),
    "header-structure": (m_header_structure, 16),
    "offsets": (m_offsets, 10),
    "config": (m_config, 22),
    "data-poison": (m_data_poison, 6),
    "index": (m_index, 7),
    "files": (m_files, 5),
}

# ------------------------------------------------------------------------------------------------
# Running cases
# ------------------------------------------------------------------------------------------------

_options = {}


def limit_memory():
    os.setsid()
    mb = _options.get("memory_limit_mb", 0)
    if mb:
        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(cmd, timeout):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit_memory)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return "hang", None, stdout.decode(errors="replace"), stderr.decode(errors="replace"), time.monotonic() - start
    return "done", proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"), time.monotonic() - start


def classify(state, rc, stdout):
    """(outcome, detail): outcome is 'ok', a status name, or 'crash' / 'hang' / 'contract'."""
    if state == "hang":
        return "hang", ""
    if rc < 0:
        return "crash", f"signal {-rc} ({signal.Signals(-rc).name})"
    first = stdout.splitlines()[0] if stdout else ""
    if rc == 2:
        return "contract", first
    if rc != 0:
        return "crash", f"exit status {rc}"
    status = first.split(" ", 1)[0]
    if status == "DYNMOE_OK":
        return "ok", ""
    if status in STATUS_NAMES:
        return status, first
    return "contract", f"unparsable driver output {first!r}"


def checkpoint_case(args):
    index, seed = args
    rng = random.Random(seed * 1_000_003 + index)
    category = rng.choices(list(MUTATORS), weights=[w for _, w in MUTATORS.values()])[0]
    fixture_name = rng.choice(FIXTURES)
    fx = fixture(fixture_name)
    out = tempfile.mkdtemp(prefix="dynmoe-fuzz-", dir=_options["tmp"])
    try:
        for f in fx["files"]:
            try:
                os.link(os.path.join(fx["dir"], f), os.path.join(out, f))
            except OSError:
                shutil.copy(os.path.join(fx["dir"], f), os.path.join(out, f))
        description = MUTATORS[category][0](rng, fx, out)
        state, rc, stdout, stderr, elapsed = run([LOAD_DRIVER, out], _options["timeout"])
        outcome, detail = classify(state, rc, stdout)
        warnings = []
        first = stdout.splitlines()[0] if stdout else ""
        if outcome in ("DYNMOE_ERR_IO", "DYNMOE_ERR_FORMAT", "DYNMOE_ERR_UNSUPPORTED") and "dynmoe_model_load" in first \
                and out not in first:
            warnings.append("load error message does not name a path in the checkpoint")
        if outcome not in ("ok", "crash", "hang", "contract") and "dynmoe_model_load" not in first:
            warnings.append("checkpoint loaded but a later call failed")
        if outcome == "DYNMOE_ERR_INVALID_ARGUMENT" and "dynmoe_model_load" in first:
            warnings.append("load of a corrupt checkpoint reported INVALID_ARGUMENT")
        if elapsed > _options["slow"]:
            warnings.append(f"slow: {elapsed:.1f} s")
        kept = None
        if outcome in ("crash", "hang", "contract") and _options.get("keep"):
            kept = os.path.join(_options["keep"], f"case-{seed}-{index}-{category}")
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(out, kept, symlinks=True)
        return {"kind": "checkpoint", "index": index, "category": category, "fixture": fixture_name,
                "description": description, "outcome": outcome, "detail": detail, "first": first,
                "stderr": stderr[:800], "warnings": warnings, "elapsed": elapsed, "kept": kept}
    finally:
        for root, dirs, _ in os.walk(out):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o755)
                except OSError:
                    pass
        shutil.rmtree(out, ignore_errors=True)


def api_case(args):
    index, seed = args
    api_seed = seed * 1_000_003 + index
    state, rc, stdout, stderr, elapsed = run([API_DRIVER, FIXTURES_DIR, str(api_seed), str(_options["api_ops"])],
                                             _options["api_timeout"])
    if state == "hang":
        outcome, detail = "hang", ""
    elif rc < 0:
        outcome, detail = "crash", f"signal {-rc} ({signal.Signals(-rc).name})"
    elif rc == 3:
        outcome, detail = "contract", " | ".join(l for l in stdout.splitlines() if l.startswith("VIOLATION"))[:1500]
    elif rc != 0:
        outcome, detail = "crash", f"exit status {rc}"
    else:
        outcome, detail = "ok", ""
    summary = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    calls = Counter()
    for item in summary.split():
        key, _, value = item.partition("=")
        if key.startswith("DYNMOE_") and value.isdigit():
            calls[key] += int(value)
    return {"kind": "api", "index": index, "category": "api-sequence", "fixture": "*",
            "description": f"api_driver {FIXTURES_DIR} {api_seed} {_options['api_ops']}", "outcome": outcome,
            "detail": detail, "first": summary, "stderr": stderr[:800], "calls": calls, "warnings":
            [f"slow: {elapsed:.1f} s"] if elapsed > _options["slow"] * 4 else [], "elapsed": elapsed, "kept": None}


def init_worker(options):
    _options.update(options)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="checkpoint mutants to load (default 1000)")
    parser.add_argument("--api-runs", type=int, default=None, help="API sequences to run (default cases/20, at least 20)")
    parser.add_argument("--api-ops", type=int, default=300, help="calls per API sequence (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="parallel subprocesses (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per checkpoint case (default 10)")
    parser.add_argument("--memory-limit-mb", type=int, default=4096,
                        help="address-space limit of each driver process (default 4096; 0 = none)")
    parser.add_argument("--keep-failures", metavar="DIR", help="copy the mutants that failed into DIR")
    parser.add_argument("--category", action="append", choices=sorted(MUTATORS), help="only these mutators")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every case")
    parser.add_argument("--rebuild", action="store_true", help="recompile the drivers")
    args = parser.parse_args()

    build_drivers(force=args.rebuild)
    if args.category:
        for name in list(MUTATORS):
            if name not in args.category:
                del MUTATORS[name]
    api_runs = args.api_runs if args.api_runs is not None else max(20, args.cases // 20)
    if args.keep_failures:
        os.makedirs(args.keep_failures, exist_ok=True)
    options = {"timeout": args.timeout, "api_timeout": max(60.0, args.timeout * 6), "api_ops": args.api_ops,
               "memory_limit_mb": args.memory_limit_mb, "keep": args.keep_failures and os.path.abspath(args.keep_failures),
               "tmp": tempfile.gettempdir() if os.path.isdir("/tmp") else None, "slow": 3.0}
    print(f"fuzzing: {args.cases} checkpoint cases, {api_runs} API sequences x {args.api_ops} calls, seed {args.seed}, "
          f"{args.jobs} jobs, timeout {args.timeout:g} s", flush=True)

    # The derived fixtures are written once, here, before the workers fork.
    options["derived"] = tempfile.mkdtemp(prefix="dynmoe-fuzz-derived-", dir=options["tmp"])
    _options.update(options)
    for name in FIXTURES:
        fixture(name)

    start = time.monotonic()
    results = []
    jobs = [(checkpoint_case, (i, args.seed)) for i in range(args.cases)] + [(api_case, (i, args.seed)) for i in range(api_runs)]
    with multiprocessing.get_context("fork").Pool(args.jobs, initializer=init_worker, initargs=(options,)) as pool:
        pending = [pool.apply_async(fn, (a,)) for fn, a in jobs]
        for n, p in enumerate(pending, 1):
            r = p.get()
            results.append(r)
            if args.verbose or r["outcome"] in ("crash", "hang", "contract"):
                print(f"[{n}/{len(jobs)}] {r['category']:<18} {r['fixture']:<19} {r['outcome']:<28} {r['description'][:110]}"
                      + (f"  -- {r['detail'][:200]}" if r["outcome"] in ("crash", "hang", "contract") else ""), flush=True)
            elif n % 500 == 0:
                print(f"[{n}/{len(jobs)}] {time.monotonic() - start:.0f} s", flush=True)

    failed_outcomes = ("crash", "hang", "contract")
    by_category = defaultdict(Counter)
    warnings = Counter()
    warning_examples = {}
    for r in results:
        by_category[r["category"]][r["outcome"]] += 1
        for w in r["warnings"]:
            key = w.split(":")[0] if w.startswith("slow") else w
            warnings[key] += 1
            warning_examples.setdefault(key, r)

    print()
    print(f"{'category':<18} {'cases':>6} {'ok':>6} {'clean-err':>9} {'crash':>6} {'hang':>5} {'contract':>8}   errors by status")
    for cat in list(MUTATORS) + ["api-sequence"]:
        c = by_category.get(cat)
        if not c:
            continue
        total = sum(c.values())
        clean_errors = sum(v for k, v in c.items() if k.startswith("DYNMOE_ERR"))
        statuses = ", ".join(f"{k.replace('DYNMOE_ERR_', '')}={v}" for k, v in sorted(c.items()) if k.startswith("DYNMOE_ERR"))
        print(f"{cat:<18} {total:>6} {c['ok']:>6} {clean_errors:>9} {c['crash']:>6} {c['hang']:>5} {c['contract']:>8}   {statuses}")

    api_calls = Counter()
    for r in results:
        api_calls.update(r.get("calls", {}))
    if api_calls:
        print(f"\nAPI calls made by the sequences: {sum(api_calls.values())}; by status: "
              + ", ".join(f"{k.replace('DYNMOE_ERR_', '').replace('DYNMOE_', '')}={v}" for k, v in sorted(api_calls.items())))

    if warnings:
        print("\nwarnings (not failures):")
        for w, n in warnings.most_common():
            ex = warning_examples[w]
            print(f"  {n:>5} x {w}\n          e.g. {ex['fixture']}: {ex['description'][:120]}\n          -> {ex['first'][:200]}")

    failures = [r for r in results if r["outcome"] in failed_outcomes]
    if failures:
        # Group by category, outcome and the first stderr line with numbers blanked out, so that one
        # bug hit with many values is listed once.
        groups = defaultdict(list)
        for r in failures:
            first_err = (r["stderr"].strip().splitlines() or [""])[0]
            groups[(r["category"], r["outcome"], re.sub(r"\d+", "N", first_err)[:100])].append(r)
        print(f"\nfailures ({len(failures)}, {len(groups)} kinds):")
        for (category, outcome, err), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            print(f"- {len(members)} x [{category}] {outcome}" + (f": {err}" if err else ""))
            for r in members[:3]:
                print(f"    e.g. {r['fixture']}: {r['description'][:200]}" + (f"  ({r['detail'][:200]})" if r["detail"] else ""))
                if r["kept"]:
                    print(f"         kept: {r['kept']}")

    passed = len(results) - len(failures)
    print(f"\ntime {time.monotonic() - start:.0f} s")
    print(f"{passed} passed, {len(failures)} failed")
    shutil.rmtree(options["derived"], ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
