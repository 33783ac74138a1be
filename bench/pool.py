#!/usr/bin/env python3
"""Pools the decode passes of several bench/run.py results files, row by row.

One run of the benchmark judges each row by the median of its few passes (three by default),
and the machine's bandwidth moves between runs; several runs pooled say more about whether a
row reaches a target than any one of them. For every (preset, threads, routing) row found in the
files this prints the number of passes, the median pass's percentage of the strict bandwidth
floor and of the sustained reads, and how many passes reach the threshold (85 % by default, the
issue's decode target), then how many rows' median passes reach it.

    python3 bench/pool.py bench/out/results-*.json
    python3 bench/pool.py --threshold 90 --json a.json b.json    # machine-readable

Files from runs without sustained reads (`--sustained-ms 0`) count for the strict figure only.
"""

import argparse
import json
import statistics
import sys


def pool(documents):
    """{(preset, threads, routing): {"strict": [...], "sustained": [...]}} over all passes, in
    the order the rows first appear."""
    rows = {}
    for doc in documents:
        for r in doc["results"]:
            key = (r.get("preset", "?"), r["threads"], r["routing"])
            row = rows.setdefault(key, {"strict": [], "sustained": []})
            for p in r["decode"].get("passes", []):
                if p.get("pct_of_floor") is not None:
                    row["strict"].append(p["pct_of_floor"])
                if p.get("pct_of_sustained_floor") is not None:
                    row["sustained"].append(p["pct_of_sustained_floor"])
    return rows


def summarize(rows, threshold):
    out = []
    for (preset, threads, routing), v in rows.items():
        entry = {"preset": preset, "threads": threads, "routing": routing, "passes": len(v["strict"])}
        for kind in ("strict", "sustained"):
            values = v[kind]
            entry[kind] = {
                "median": statistics.median(values) if values else None,
                "passes_at_threshold": sum(1 for x in values if x >= threshold),
                "passes": len(values),
            }
        out.append(entry)
    return out


def main():
    ap = argparse.ArgumentParser(description="pool the decode passes of several benchmark results files")
    ap.add_argument("files", nargs="+", help="results JSON files written by bench/run.py")
    ap.add_argument("--threshold", type=float, default=85.0, help="percentage a pass should reach (default 85)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()

    documents = []
    for path in args.files:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"pool.py: cannot read {path}: {e}")
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
            sys.exit(f"pool.py: {path} is not a bench/run.py results file (no \"results\" list)")
        documents.append(doc)
    summary = summarize(pool(documents), args.threshold)
    if args.json:
        json.dump({"files": args.files, "threshold": args.threshold, "rows": summary}, sys.stdout, indent=1)
        print()
        return

    commits = sorted({(d.get("git") or {}).get("describe") or "?" for d in documents})
    print(f"{len(documents)} file(s), commit(s) {', '.join(commits)}; threshold {args.threshold:g} %")
    print()
    print(f"| preset | threads | routing | passes | median % of floor | passes >= {args.threshold:g} % | "
          f"median % of sustained | passes >= {args.threshold:g} % |")
    print("| :--- | ---: | :--- | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda x: "–" if x is None else f"{x:.0f} %"
    for e in summary:
        s, u = e["strict"], e["sustained"]
        print(f"| {e['preset']} | {e['threads']} | {e['routing']} | {e['passes']} | {fmt(s['median'])} | "
              f"{s['passes_at_threshold']} of {s['passes']} | {fmt(u['median'])} | "
              f"{u['passes_at_threshold']} of {u['passes']} |")
    print()
    for kind, name in (("strict", "the strict floor"), ("sustained", "the sustained reads")):
        judged = [e for e in summary if e[kind]["median"] is not None]
        reached = [e for e in judged if e[kind]["median"] >= args.threshold]
        print(f"rows whose median pass reaches {args.threshold:g} % of {name}: {len(reached)} of {len(judged)}")


if __name__ == "__main__":
    main()
