#!/usr/bin/env python3
"""plot_routing_sweep.py — draw the top-p threshold trade-off measured by routing_sweep.

Reads the CSV that `build/bin/routing_sweep MODEL_DIR --csv` prints (a header row
`threshold,mean_experts_per_token,activated_parameters_per_token,activated_fraction,layerL_mean,...`
then one row per threshold) from a file or standard input, and draws two panels against the
top-p threshold:

  (a) mean experts per token over the MoE layers, with each MoE layer's own mean;
  (b) activated parameters per token (left axis) and as a share of all parameters (right axis).

    build/bin/routing_sweep Tests/Fixtures/olmoe-tiny/model --csv \
        | python3 examples/plot_routing_sweep.py - -o sweep.png
    build/bin/routing_sweep MODEL --csv --thresholds 0.05,0.1,0.2,0.3,0.5,0.7,0.9 > sweep.csv
    python3 examples/plot_routing_sweep.py sweep.csv -o sweep.png --title "OLMoE, 512 tokens"

Exit status: 0 on success, 1 when the input cannot be read or is not routing_sweep CSV,
2 on a command-line error.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

PROG = "plot_routing_sweep.py"
FIXED_COLUMNS = ("threshold", "mean_experts_per_token", "activated_parameters_per_token", "activated_fraction")
LAYER_COLUMN = re.compile(r"^layer(\d+)_mean$")

#: above this many MoE layers the per-layer curves get a colorbar instead of a legend
MAX_LEGEND_LAYERS = 10


class InputError(Exception):
    """The input is missing, unreadable or not the CSV of routing_sweep --csv."""


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_sweep(text: str, name: str) -> dict:
    """Parses routing_sweep CSV text; returns {"layers": [L...], "rows": [{column: float}...]} sorted by threshold."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{name} is empty (expected the output of `routing_sweep MODEL --csv`)")
    if lines[0].startswith(("model:", "usage:")):
        raise InputError(f"{name} looks like routing_sweep's table output; run routing_sweep with --csv")
    reader = csv.reader(lines)
    header = [cell.strip() for cell in next(reader)]
    if tuple(header[:4]) != FIXED_COLUMNS:
        raise InputError(f"{name} is not routing_sweep CSV: the header must start with {','.join(FIXED_COLUMNS)}, "
                         f"got {_shorten(','.join(header[:4]))!r}")
    layers = []
    for column in header[4:]:
        match = LAYER_COLUMN.match(column)
        if not match:
            raise InputError(f"{name}: unexpected column {column!r} (expected layerL_mean)")
        layers.append(int(match.group(1)))
    if not layers:
        raise InputError(f"{name}: no per-layer columns (layerL_mean); the model has no MoE layer?")
    rows = []
    for number, cells in enumerate(reader, start=2):
        if len(cells) != len(header):
            raise InputError(f"{name} line {number}: {len(cells)} fields, the header has {len(header)}")
        try:
            values = [float(cell) for cell in cells]
        except ValueError:
            raise InputError(f"{name} line {number}: not a number in {','.join(cells)!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"{name} line {number}: non-finite value")
        if not 0.0 < values[0] <= 1.0:
            raise InputError(f"{name} line {number}: threshold {values[0]} is not in (0, 1]")
        if values[3] < 0 or values[2] < 0:
            raise InputError(f"{name} line {number}: negative parameter count or fraction")
        rows.append(dict(zip(header, values)))
    if not rows:
        raise InputError(f"{name} has a header but no rows")
    rows.sort(key=lambda row: row["threshold"])
    return {"layers": layers, "rows": rows}


def read_sweep(path: str) -> dict:
    name = "standard input" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise InputError(f"{name} is not a UTF-8 text file") from None
    return parse_sweep(text, name)


def _human(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def plot(sweep: dict, output: str, title: str | None = None, dpi: int = 120) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    rows, layers = sweep["rows"], sweep["layers"]
    p = np.array([row["threshold"] for row in rows])
    mean_k = np.array([row["mean_experts_per_token"] for row in rows])
    params = np.array([row["activated_parameters_per_token"] for row in rows])
    fraction = np.array([row["activated_fraction"] for row in rows])
    per_layer = np.array([[row[f"layer{layer}_mean"] for row in rows] for layer in layers])
    totals = params[fraction > 0] / fraction[fraction > 0]
    total = float(np.median(totals)) if totals.size else None

    fig, (ax_k, ax_p) = plt.subplots(1, 2, figsize=(13.5, 5.6), dpi=dpi, layout="constrained")
    heading = f"Top-p routing trade-off: {len(layers)} MoE layer{'s' if len(layers) != 1 else ''}"
    if total:
        heading += f", {_human(total)} parameters"
    lo, hi = int(np.argmin(p)), int(np.argmax(p))
    if lo == hi or p[lo] == p[hi]:
        detail = (f"threshold {p[lo]:g}: {mean_k[lo]:.2f} experts/token, "
                  f"{100 * fraction[lo]:.1f}% of the parameters active per token")
    else:
        detail = (f"threshold {p[lo]:g} → {p[hi]:g}: {mean_k[lo]:.2f} → {mean_k[hi]:.2f} experts/token, "
                  f"{100 * fraction[lo]:.1f}% → {100 * fraction[hi]:.1f}% of the parameters active per token")
    fig.suptitle(f"{heading}\n{title + '; ' if title else ''}{detail}", fontsize=13)

    marker = "o" if len(p) <= 40 else None
    # -- (a) experts per token ----------------------------------------------------------------
    if len(layers) <= MAX_LEGEND_LAYERS:
        colors = matplotlib.colormaps["tab10"](np.arange(len(layers)) % 10)
    else:
        colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.92, len(layers)))
    for i, layer in enumerate(layers):
        ax_k.plot(p, per_layer[i], color=colors[i], linewidth=1.2, alpha=0.85,
                  marker="." if marker else None, markersize=5, label=f"layer {layer}")
    ax_k.plot(p, mean_k, color="black", linewidth=2.6, marker=marker, markersize=6, zorder=5,
              label="mean over MoE layers")
    ax_k.set_title("(a) experts per token", fontsize=11, loc="left")
    ax_k.set_xlabel("top-p threshold p")
    ax_k.set_ylabel("mean experts per token")
    ax_k.set_ylim(bottom=0)
    ax_k.grid(alpha=0.3)
    if len(layers) <= MAX_LEGEND_LAYERS:
        ax_k.legend(loc="upper left", fontsize=9, frameon=True)
    else:
        ax_k.legend(handles=ax_k.lines[-1:], loc="upper left", fontsize=9)
        mappable = matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(min(layers), max(layers)),
            cmap=matplotlib.colors.ListedColormap(colors))
        bar = fig.colorbar(mappable, ax=ax_k, pad=0.01, fraction=0.05)
        bar.set_label("MoE layer (thin curves)")

    # -- (b) activated parameters -------------------------------------------------------------
    ax_p.plot(p, params, color="#c0392b", linewidth=2.4, marker=marker, markersize=6)
    ax_p.fill_between(p, params, color="#c0392b", alpha=0.08)
    ax_p.set_title("(b) activated parameters per token", fontsize=11, loc="left")
    ax_p.set_xlabel("top-p threshold p")
    ax_p.set_ylabel("activated parameters per token")
    ax_p.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: _human(value)))
    ax_p.set_ylim(0, float(params.max()) * 1.1 if params.max() > 0 else 1.0)
    ax_p.grid(alpha=0.3)
    if total:
        share = ax_p.secondary_yaxis("right", functions=(lambda v: v / total, lambda f: f * total))
        share.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        share.set_ylabel("share of all parameters")
    if len(p) <= 12:
        for x, y, k in zip(p, params, mean_k):
            ax_p.annotate(f"{k:.2f}", (x, y), xytext=(0, 7), textcoords="offset points", ha="center",
                          fontsize=8, color="#555555")
        ax_p.text(0.02, 0.97, "labels: mean experts/token", transform=ax_p.transAxes, ha="left", va="top",
                  fontsize=8, color="#555555")

    span = p[hi] - p[lo]
    pad = 0.03 * span if span > 0 else 0.05
    for ax in (ax_k, ax_p):
        ax.set_xlim(p[lo] - pad, p[hi] + pad)

    fig.savefig(output, dpi=dpi, facecolor="white")
    plt.close(fig)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Plot the CSV of `routing_sweep MODEL --csv`: mean experts/token (overall and per MoE "
                    "layer) and activated parameters/token versus the top-p threshold.",
        epilog="example:\n  build/bin/routing_sweep Tests/Fixtures/olmoe-tiny/model --csv | %(prog)s - -o sweep.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", metavar="CSV", help='routing_sweep --csv output ("-" = standard input)')
    parser.add_argument("-o", "--output", default="routing_sweep.png", help="PNG to write (default %(default)s)")
    parser.add_argument("--title", help="a line shown under the title, e.g. the model and input")
    parser.add_argument("--dpi", type=_positive_int, default=120, help="resolution (default %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = read_sweep(args.csv)
        plot(sweep, args.output, title=args.title, dpi=args.dpi)
    except (InputError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
