#!/usr/bin/env python3
"""plot_expert_usage.py — draw a dynmoe routing-statistics snapshot to a PNG.

The figure has two parts:

  (a) a layer x expert load heatmap: each MoE layer's expert_token_counts as a share of that
      layer's expert assignments (every row sums to 100%; a uniform router gives 1/E per cell);
  (b) the experts-per-token histogram of each MoE layer (one small panel per layer, or a
      layer x k heatmap when there are more than 16 MoE layers).

The title carries the family, the number of tokens, the mean experts per token and the
activated share of the parameters.

Input is a statistics JSON (schema "dynmoe.stats", version 1; see README.md), written by

    build/bin/expert_table MODEL_DIR --json stats.json          (C example)
    open("stats.json", "w").write(model.stats().to_json())       (Python binding)

or the script computes the statistics itself through the Python binding with --run, on a
deterministic pseudo-random batch (the same token ids as the C examples' --tokens/--batch/--seed):

    python3 examples/plot_expert_usage.py stats.json -o usage.png
    python3 examples/plot_expert_usage.py --run Tests/Fixtures/olmoe-tiny/model --routing top_p:0.5 -o usage.png

Exit status: 0 on success, 1 when the input cannot be read or is not a valid dynmoe.stats
version 1 document (or the model run fails), 2 on a command-line error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

SCHEMA = "dynmoe.stats"
VERSION = 1
REPO = Path(__file__).resolve().parents[1]
PROG = "plot_expert_usage.py"

#: above this many MoE layers the experts-per-token histograms are drawn as one heatmap
MAX_SMALL_MULTIPLES = 16


class InputError(Exception):
    """The input is missing, unreadable or not a dynmoe.stats version 1 document."""


# --------------------------------------------------------------------------------------------
# Reading and validating the JSON
# --------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return _is_number(value) and value >= 0 and float(value).is_integer()


def validate_stats(doc) -> dict:
    """Checks that `doc` is a dynmoe.stats version 1 document usable for plotting; returns it.

    Raises InputError with a message naming the offending field.
    """
    if not isinstance(doc, dict):
        raise InputError(f"expected a JSON object with \"schema\": \"{SCHEMA}\", got a JSON {type(doc).__name__}")
    schema = doc.get("schema")
    if schema != SCHEMA:
        found = "no \"schema\" field" if "schema" not in doc else f"schema {schema!r}"
        raise InputError(f"not a dynmoe statistics file: {found}, expected {SCHEMA!r} "
                         f"(write one with `expert_table MODEL --json FILE` or Stats.to_json())")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        found = "no \"version\" field" if "version" not in doc else f"version {version!r}"
        raise InputError(f"unsupported {SCHEMA} {found}; this script reads version {VERSION}")

    family = doc.get("family")
    if not isinstance(family, str):
        raise InputError("\"family\" must be a string")
    summary = doc.get("summary")
    if not isinstance(summary, dict):
        raise InputError("\"summary\" must be an object")
    for key in ("tokens", "num_layers", "num_moe_layers"):
        if not _is_count(summary.get(key)):
            raise InputError(f"summary.{key} must be a non-negative integer, got {summary.get(key)!r}")
    for key in ("mean_experts_per_token", "activated_parameters_per_token", "activated_parameter_fraction",
                "total_parameters"):
        if not _is_number(summary.get(key)):
            raise InputError(f"summary.{key} must be a number, got {summary.get(key)!r}")

    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InputError("\"layers\" must be a list")
    if len(layers) != summary["num_layers"]:
        raise InputError(f"\"layers\" has {len(layers)} entries but summary.num_layers is {summary['num_layers']}")
    moe = 0
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(layer, dict):
            raise InputError(f"{where} must be an object")
        if not _is_count(layer.get("layer")):
            raise InputError(f"{where}.layer must be a non-negative integer")
        if not isinstance(layer.get("is_moe"), bool):
            raise InputError(f"{where}.is_moe must be true or false")
        if not layer["is_moe"]:
            continue
        moe += 1
        experts = layer.get("num_experts")
        if not _is_count(experts) or experts < 1:
            raise InputError(f"{where}.num_experts must be a positive integer, got {experts!r}")
        for key, length in (("expert_token_counts", experts), ("experts_per_token_histogram", experts + 1)):
            values = layer.get(key)
            if not isinstance(values, list) or len(values) != length or not all(_is_count(v) for v in values):
                raise InputError(f"{where}.{key} must be a list of {int(length)} non-negative integers")
        for key in ("tokens",):
            if not _is_count(layer.get(key)):
                raise InputError(f"{where}.{key} must be a non-negative integer")
        if not _is_number(layer.get("mean_experts_per_token")):
            raise InputError(f"{where}.mean_experts_per_token must be a number")
    if moe != summary["num_moe_layers"]:
        raise InputError(f"{moe} layers have is_moe true but summary.num_moe_layers is {summary['num_moe_layers']}")
    if moe == 0:
        raise InputError("the statistics have no MoE layer; there is nothing to plot")
    if summary["tokens"] == 0:
        raise InputError("the statistics record no tokens (a fresh or reset snapshot); there is nothing to plot")
    return doc


def load_stats(path: str) -> dict:
    """Reads and validates a stats JSON from `path` ("-" = stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text file") from None
    name = "standard input" if path == "-" else path
    if not text.strip():
        raise InputError(f"{name} is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{name} is not valid JSON: {error}") from None
    return validate_stats(doc)


# --------------------------------------------------------------------------------------------
# --run: statistics through the Python binding
# --------------------------------------------------------------------------------------------


def pseudo_random_tokens(count: int, vocab: int, seed: int) -> list:
    """The C examples' deterministic ids (examples/common.h, ex_pseudo_random_tokens)."""
    mask = 0xFFFFFFFF
    state = (seed * 2654435761 + 12345) & mask
    tokens = []
    for _ in range(count):
        state = (state * 1664525 + 1013904223) & mask
        tokens.append((state >> 8) % max(vocab, 1))
    return tokens


def _import_dynmoe():
    """The dynmoe binding: an installed one, else the source tree's bindings/python."""
    try:
        return importlib.import_module("dynmoe")
    except ImportError:
        sys.path.insert(0, str(REPO / "bindings" / "python"))
        return importlib.import_module("dynmoe")


def parse_routing(spec: str, renormalize, dynmoe):
    """"native", "top_k:K" or "top_p:P[:MIN[:MAX]]" (as the C examples' --routing) -> a policy."""
    fields = spec.split(":")
    try:
        if fields[0] == "native" and len(fields) == 1:
            if renormalize is not None:
                raise ValueError("--renormalize needs top_k or top_p routing")
            return "native"
        if fields[0] == "top_k" and len(fields) == 2:
            return dynmoe.TopK(int(fields[1]), renormalize=renormalize)
        if fields[0] == "top_p" and 2 <= len(fields) <= 4:
            bounds = [int(v) for v in fields[2:]]
            return dynmoe.TopP(float(fields[1]), *bounds, renormalize=renormalize)
    except (TypeError, ValueError) as error:
        raise InputError(f"routing {spec!r}: {error}") from None
    raise InputError(f"unknown routing {spec!r} (expected native, top_k:K or top_p:P[:MIN[:MAX]])")


def run_stats(model_dir: str, routing: str, renormalize, tokens: int, batch: int, seed: int, threads) -> dict:
    """One forward pass of `batch` x `tokens` pseudo-random ids; returns the validated stats dict."""
    try:
        dynmoe = _import_dynmoe()
    except ImportError as error:
        raise InputError(f"--run needs the dynmoe Python binding ({error}); "
                         f"build the library with `make lib`") from None
    policy = parse_routing(routing, renormalize, dynmoe)
    try:
        with dynmoe.Model(model_dir, threads=threads) as model:
            ids = pseudo_random_tokens(batch * tokens, model.info.vocab_size, seed)
            rows = [ids[b * tokens:(b + 1) * tokens] for b in range(batch)]
            model.reset_stats()
            model.forward(rows, routing=policy)
            text = model.stats().to_json()
    except (dynmoe.DynMoEError, OSError, ValueError, TypeError) as error:
        raise InputError(f"running {model_dir}: {error}") from None
    return validate_stats(json.loads(text))


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _human(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _tick_step(count: int, target: int) -> int:
    """A 1/2/5 x 10^n step that shows at most about `target` of `count` ticks."""
    if count <= target:
        return 1
    raw = count / target
    base = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if base * factor >= raw:
            return int(base * factor)
    return int(base * 10)


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot(doc: dict, output: str, subtitle: str | None = None, dpi: int = 120) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator, MultipleLocator, PercentFormatter

    summary = doc["summary"]
    moe = [layer for layer in doc["layers"] if layer["is_moe"]]
    n_moe = len(moe)
    max_experts = max(int(layer["num_experts"]) for layer in moe)
    layer_ids = [int(layer["layer"]) for layer in moe]

    # (a) per-layer share of expert assignments; rows of layers with fewer experts are padded (NaN)
    share = np.full((n_moe, max_experts), np.nan)
    counts = np.full((n_moe, max_experts), np.nan)
    for row, layer in enumerate(moe):
        c = np.asarray(layer["expert_token_counts"], dtype=np.float64)
        counts[row, : c.size] = c
        share[row, : c.size] = c / c.sum() if c.sum() > 0 else 0.0

    # (b) experts-per-token distribution of each layer (share of the layer's tokens)
    hist = np.zeros((n_moe, max_experts + 1))
    for row, layer in enumerate(moe):
        h = np.asarray(layer["experts_per_token_histogram"], dtype=np.float64)
        hist[row, : h.size] = h / h.sum() if h.sum() > 0 else 0.0
    used_k = np.nonzero(hist.sum(axis=0))[0]
    k_lo = int(min(used_k.min(), 1)) if used_k.size else 0
    k_hi = int(used_k.max()) if used_k.size else max_experts
    k_hi = min(max(k_hi + 1, k_lo + 4), max_experts)  # some room right of the last bar
    ks = np.arange(k_lo, k_hi + 1)

    small_multiples = n_moe <= MAX_SMALL_MULTIPLES
    ncols = 1 if not small_multiples else min(n_moe, 4)
    nrows = 1 if not small_multiples else math.ceil(n_moe / ncols)

    width = float(np.clip(2.0 + 0.42 * max_experts, 10.0, 18.0))
    heat_h = float(np.clip(0.9 + 0.38 * n_moe, 2.6, 9.0))
    hist_h = 2.5 * nrows if small_multiples else float(np.clip(0.9 + 0.3 * n_moe, 3.0, 7.0))
    fig = plt.figure(figsize=(width, heat_h + hist_h + 1.6), dpi=dpi, layout="constrained")
    fig.get_layout_engine().set(h_pad=0.12, hspace=0.06)
    top, bottom = fig.subfigures(2, 1, height_ratios=[heat_h, hist_h])

    # -- title ----------------------------------------------------------------------------------
    title = (f"{doc['family']}: expert usage over {int(summary['tokens']):,} tokens — "
             f"mean {summary['mean_experts_per_token']:.2f} experts/token")
    detail = (f"{n_moe} MoE layer{'s' if n_moe != 1 else ''} of {int(summary['num_layers'])}; "
              f"activated parameters/token {_human(summary['activated_parameters_per_token'])} = "
              f"{100 * summary['activated_parameter_fraction']:.1f}% of {_human(summary['total_parameters'])}")
    if subtitle:
        detail = f"{subtitle}; {detail}"
    fig.suptitle(f"{title}\n{detail}", fontsize=13)

    # -- (a) load heatmap -------------------------------------------------------------------------
    ax = top.subplots()
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#d9d9d9")
    vmax = float(np.nanmax(share)) if np.isfinite(share).any() else 1.0
    image = ax.imshow(np.ma.masked_invalid(share), aspect="auto", cmap=cmap, vmin=0.0, vmax=max(vmax, 1e-9),
                      interpolation="nearest")
    annotate = max_experts <= 32 and n_moe <= 24
    ax.set_title("(a) expert load: share of each MoE layer's expert assignments"
                 + (" (numbers: tokens routed to the expert)" if annotate else ""), fontsize=11, loc="left")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    xstep = _tick_step(max_experts, 32)
    ax.set_xticks(np.arange(0, max_experts, xstep))
    ystep = _tick_step(n_moe, 24)
    ax.set_yticks(np.arange(0, n_moe, ystep))
    ax.set_yticklabels([str(layer_ids[i]) for i in range(0, n_moe, ystep)])
    if annotate:
        size = 9 if max_experts <= 16 else 7
        for row in range(n_moe):
            for col in range(max_experts):
                if np.isfinite(counts[row, col]):
                    ax.text(col, row, f"{int(counts[row, col])}", ha="center", va="center", fontsize=size,
                            color=_text_color(cmap(share[row, col] / max(vmax, 1e-9))))
    bar = top.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    uniform = 1.0 / max_experts
    if uniform <= vmax:
        bar.ax.axhline(uniform, color="white", linewidth=3.5)
        bar.ax.axhline(uniform, color="black", linewidth=1.6, linestyle=(0, (3, 2)))
        bar.set_label(f"share of the layer's assignments\n(dashed: uniform load, 1/{max_experts})")
    else:
        bar.set_label("share of the layer's assignments")

    # -- (b) experts-per-token histograms ---------------------------------------------------------
    bottom.suptitle("(b) experts per token: share of each MoE layer's tokens that ran k experts "
                    "(dashed: layer mean)", fontsize=11, x=0.01, ha="left")
    if small_multiples:
        axes = np.atleast_1d(bottom.subplots(nrows, ncols, sharex=True, sharey=True)).ravel()
        ymax = float(hist[:, ks].max()) if hist.size else 1.0
        for i, layer in enumerate(moe):
            ax = axes[i]
            values = hist[i, ks]
            ax.bar(ks, values, width=0.8, color="#3b75af", edgecolor="#1f4e79", linewidth=0.6)
            mean_k = float(layer["mean_experts_per_token"])
            ax.axvline(mean_k, color="#d62728", linestyle="--", linewidth=1.3, zorder=1.5)
            ax.set_title(f"layer {layer_ids[i]}: mean {mean_k:.2f}", fontsize=10)
            ax.set_ylim(0, ymax * 1.16 if ymax > 0 else 1.0)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            if len(ks) <= 16:
                ax.xaxis.set_major_locator(MultipleLocator(1))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            if len(ks) <= 10:
                for k, v in zip(ks, values):
                    if v > 0:
                        ax.text(k, v + 0.01 * ymax, f"{100 * v:.0f}%", ha="center", va="bottom", fontsize=8,
                                zorder=3, bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none"))
            if i % ncols == 0:
                ax.set_ylabel("share of tokens")
            if i >= n_moe - ncols:
                ax.set_xlabel("experts per token (k)")
                ax.tick_params(labelbottom=True)
        for ax in axes[n_moe:]:
            ax.set_visible(False)
    else:
        ax = bottom.subplots()
        image = ax.imshow(hist[:, ks], aspect="auto", cmap="magma_r", vmin=0.0, interpolation="nearest",
                          extent=(ks[0] - 0.5, ks[-1] + 0.5, n_moe - 0.5, -0.5))
        means = [float(layer["mean_experts_per_token"]) for layer in moe]
        ax.plot(means, np.arange(n_moe), color="deepskyblue", linestyle="--", marker="o", markersize=3,
                linewidth=1.2, label="layer mean")
        ax.legend(loc="lower right", fontsize=9)
        ax.set_xlabel("experts per token (k)")
        ax.set_ylabel("MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yticks(np.arange(0, n_moe, ystep))
        ax.set_yticklabels([str(layer_ids[i]) for i in range(0, n_moe, ystep)])
        bar = bottom.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
        bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        bar.set_label("share of the layer's tokens")

    fig.savefig(output, dpi=dpi, facecolor="white")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"the seed must be in [0, 2^32), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Draw a dynmoe routing-statistics snapshot (schema dynmoe.stats, version 1) to a PNG: "
                    "a layer x expert load heatmap and the experts-per-token histogram of each MoE layer.",
        epilog="examples:\n"
               "  build/bin/expert_table MODEL --json stats.json && %(prog)s stats.json -o usage.png\n"
               "  %(prog)s --run Tests/Fixtures/olmoe-tiny/model --routing top_p:0.5 -o usage.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stats", nargs="?", metavar="STATS.json",
                        help='statistics JSON ("-" = standard input); omit with --run')
    parser.add_argument("-o", "--output", default="expert_usage.png", help="PNG to write (default %(default)s)")
    parser.add_argument("--dpi", type=_positive_int, default=120, help="resolution (default %(default)s)")
    parser.add_argument("--title", help="a line shown under the title (default: the routing with --run)")
    run = parser.add_argument_group("computing the statistics (--run)")
    run.add_argument("--run", metavar="MODEL_DIR", help="run one forward pass of MODEL_DIR through the Python "
                                                        "binding instead of reading STATS.json")
    run.add_argument("--routing", default="native",
                     help="native | top_k:K | top_p:P[:MIN[:MAX]] for every MoE layer (default native)")
    run.add_argument("--renormalize", choices=("0", "1", "native"), default="native",
                     help="divide the chosen experts' weights by their sum (default: as the checkpoint)")
    run.add_argument("--tokens", type=_positive_int, default=64, help="tokens per sequence (default 64)")
    run.add_argument("--batch", type=_positive_int, default=1, help="sequences (default 1)")
    run.add_argument("--seed", type=_seed, default=1, help="seed of the pseudo-random ids (default 1)")
    run.add_argument("--threads", type=int, default=None, help="compute threads (default: every CPU)")
    run.add_argument("--save-json", metavar="FILE", help="also write the computed statistics JSON to FILE")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.stats is None) == (args.run is None):
        parser.error("give either STATS.json or --run MODEL_DIR (exactly one)")
    if args.stats is not None and (args.save_json or args.routing != "native" or args.renormalize != "native"):
        parser.error("--routing, --renormalize and --save-json only apply with --run")
    try:
        if args.run is not None:
            renormalize = {"0": False, "1": True, "native": None}[args.renormalize]
            doc = run_stats(args.run, args.routing, renormalize, args.tokens, args.batch, args.seed, args.threads)
            if args.save_json:
                Path(args.save_json).write_text(json.dumps(doc) + "\n", encoding="utf-8")
            subtitle = args.title or f"routing {args.routing}"
        else:
            doc = load_stats(args.stats)
            subtitle = args.title
        plot(doc, args.output, subtitle=subtitle, dpi=args.dpi)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
