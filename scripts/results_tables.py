"""Markdown tables for docs/results.md, read from `python -m fewshot eval` output folders.

    python scripts/results_tables.py out/chaos-alpnet out/cmr-alpnet ...

Every figure printed comes from a run's metrics.json, so the document cannot drift from the runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _mm(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def describe(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    timing = m.get("timing") or {}
    folds = m.get("folds") or []
    supports = sorted({s for f in folds for s in f.get("support_ids", [])}, key=lambda s: (len(s), s))
    shots = len(folds[0]["support_ids"]) if folds and m["protocol"] == "clinical" else None
    return {
        "name": folder.name,
        "protocol": m["protocol"],
        "dataset": (m.get("dataset") or {}).get("name", Path(m.get("data", "")).name),
        "shots": shots,
        "labels": list(m["per_label"]),
        "dice": {k: v.get("dice_mean") for k, v in m["per_label"].items()},
        "std": {k: v.get("dice_std") for k, v in m["per_label"].items()},
        "n": {k: v.get("n") for k, v in m["per_label"].items()},
        "hd95": {k: v.get("hd95_mean") for k, v in m["per_label"].items()},
        "mean": m.get("mean_dice"),
        "mean_hd95": m.get("mean_hd95"),
        "s_per_slice": timing.get("wall_seconds_per_query_slice"),
        "supports": supports,
        "selection": m.get("selection"),
    }


def table(runs: list[dict]) -> str:
    labels = runs[0]["labels"]
    head = "| run | " + " | ".join(labels) + " | mean Dice | mean HD95 (mm) | s / slice |"
    rule = "|---" * (len(labels) + 4) + "|"
    rows = [head, rule]
    for r in runs:
        what = f"{r['protocol']}" + (f", {r['shots']} shot{'s' if r['shots'] != 1 else ''}" if r["shots"] else "")
        if r["selection"]:
            grid = ", ".join(f"{k} ∈ {v}" for k, v in r["selection"]["grid"].items())
            what += f", nested selection of {grid}"
        cells = [f"{_pct(r['dice'][lab])} ± {_pct(r['std'][lab])}" for lab in labels]
        rows.append(f"| {what} | " + " | ".join(cells)
                    + f" | **{_pct(r['mean'])}** | {_mm(r['mean_hd95'])} | {r['s_per_slice']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    runs = [describe(Path(a)) for a in argv]
    by_dataset: dict[str, list[dict]] = {}
    for r in runs:
        by_dataset.setdefault(r["dataset"], []).append(r)
    for dataset, group in by_dataset.items():
        print(f"#### {dataset}\n")
        print(table(group))
        print()
        for r in group:
            print(f"- `{r['name']}`: support scans {', '.join(r['supports'])}; "
                  f"n = {', '.join(f'{k} {v}' for k, v in r['n'].items())}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
