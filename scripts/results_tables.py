"""Markdown tables for docs/results.md, read from `python -m fewshot eval` output folders.

    python scripts/results_tables.py out/chaos-alpnet out/cmr-alpnet ...
    python scripts/results_tables.py --growth out/cmr-growth out/chaos-growth
    python scripts/results_tables.py --compare OLD_RUN NEW_RUN [OLD_RUN NEW_RUN ...]   # on the queries both scored
    python scripts/results_tables.py --points out/cmr1-sel-extent ...   # each --select grid point, and what nesting chose
    python scripts/results_tables.py --pooled out/cmr-growth-sel out/chaos-growth-sel   # one setting for all datasets
    python scripts/results_tables.py --ablation REFERENCE_RUN RUN [RUN ...]   # each row named by its settings' difference

Per label: Dice mean ± std over query scans, and in brackets HD95 mean in mm.

Every figure printed comes from a run's metrics.json, so the document cannot drift from the runs.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _pct(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _gain(first, last) -> str:
    """The change from the curve's first point to its last, in points; "–" when either is missing (null in
    metrics.json: no scan scored there)."""
    if first is None or last is None or not math.isfinite(first) or not math.isfinite(last):
        return "–"
    return f"{100 * (last - first):+.1f}"


def _point_name(overrides) -> str:
    """A grid point by its overrides' last key parts: ``correlation=True``."""
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


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
        "s_per_volume": timing.get("wall_seconds_per_volume"),
        "support": (m.get("protocol_settings") or {}).get("support", "slices"),
        "pairing": (m.get("protocol_settings") or {}).get("pairing", "chunk"),
        "max_queries": m.get("max_queries"),
        "preset": m.get("preset"),
        "supports": supports,
        "selection": m.get("selection"),
        "settings": m.get("settings") or {},
    }


# What an alpnet row's support was, when it is not the protocol's fixed slices.
ALPNET_SUPPORT_NOTES = {
    "volume": ", **whole support volume** (not the protocol)",
    "propagated": ", **support slices carried through the support scan** (the protocol's labels)",
}


def table(runs: list[dict]) -> str:
    labels = runs[0]["labels"]
    head = "| run | " + " | ".join(labels) + " | mean Dice | mean HD95 (mm) | s / slice | s / volume |"
    rule = "|---" * (len(labels) + 5) + "|"
    rows = [head, rule]
    for r in runs:
        what = f"`{r['preset']}`, {r['protocol']}" + (f", {r['shots']} shot{'s' if r['shots'] != 1 else ''}" if r["shots"] else "")
        if r["protocol"] == "alpnet":
            what += ALPNET_SUPPORT_NOTES.get(r["support"], "")
            if r["pairing"] == "all":
                what += ", **every support slice offered to every query slice** (the protocol's labels, not its pairing)"
        if r["max_queries"]:
            what += f", first {r['max_queries']} query scans"
        if r["selection"]:
            grid = ", ".join(f"{k} ∈ {v}" for k, v in r["selection"]["grid"].items())
            what += f", nested selection of {grid}"
        cells = [f"{_pct(r['dice'][lab])} ± {_pct(r['std'][lab])} ({_mm(r['hd95'][lab])})" for lab in labels]
        per_volume = "–" if r["s_per_volume"] is None else f"{r['s_per_volume']:.1f}"
        rows.append(f"| {what} | " + " | ".join(cells)
                    + f" | **{_pct(r['mean'])}** | {_mm(r['mean_hd95'])} | {r['s_per_slice']:.2f} | {per_volume} |")
    return "\n".join(rows)


def growth_table(folder: Path) -> str:
    """Mean Dice per step of each growth strategy, and the gain from the first step to the last."""
    m = json.loads((folder / "metrics.json").read_text())
    strategies = m["growth"]["strategies"]
    steps = [p["n_labelled"] for p in next(iter(strategies.values()))["points"]]
    rows = [f"| `{folder.name}` | " + " | ".join(f"{n} labelled" for n in steps) + " | last - first |",
            "|---" * (len(steps) + 2) + "|"]
    for name, data in strategies.items():
        points = data["points"]
        cells = [f"{_pct(p['dice_mean'])} ± {_pct(p['dice_std'])}" for p in points]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {_gain(points[0]['dice_mean'], points[-1]['dice_mean'])} |")
    order = strategies.get("bank_coverage", {}).get("runs", [{}])[0].get("order") or ["differs by grid point"]
    rows += ["", f"Query scans: {', '.join(m['growth']['query_ids'])}; bank_coverage order: {', '.join(order)}."]
    selection = m["growth"].get("selection")
    if selection:  # --select with --growth: the rows above are nested; each point's own curve, for inspection
        rows += ["", "| grid point | " + " | ".join(f"{n} labelled" for n in steps) + " | last - first | chosen by |",
                 "|---" * (len(steps) + 3) + "|"]
        for point in selection["points"]:
            curve = [point["curve"][str(n)] for n in steps]  # JSON keys are strings
            groups = [g for g in selection["per_group"] if g["chosen_point"] == point["point"]]
            name = _point_name(point["overrides"])
            rows.append(f"| {name} | " + " | ".join(_pct(d) for d in curve) + f" | {_gain(curve[0], curve[-1])} | "
                        f"{len(groups)}/{len(selection['per_group'])} |")
    return "\n".join(rows)


def pooled_table(folders: list[Path]) -> str:
    """``--select`` with ``--growth`` runs of one grid on several datasets: the setting chosen for each group of
    query scans on ALL the other groups, every dataset's (``selection.pooled_growth_selection``), and the nested
    curve per dataset."""
    import csv

    from fewshot.eval.selection import pooled_growth_selection

    grids, names = {}, None
    for folder in folders:
        selection = json.loads((folder / "metrics.json").read_text())["growth"]["selection"]
        these = [_point_name(p["overrides"]) for p in selection["points"]]
        if names is not None and these != names:
            raise SystemExit(f"{folder}: another grid ({these} against {names}); pooling needs the same grid")
        names = these
        name = folder.name if sum(f.name == folder.name for f in folders) == 1 else str(folder)  # runs kept apart
        with open(folder / "growth_grid.csv") as f:
            grids[name] = list(csv.DictReader(f))
    pooled = pooled_growth_selection(grids)
    steps = sorted(next(iter(pooled["nested"].values())))
    rows = ["| held-out group | query scans | chosen | mean Dice over the curve, other groups | this group |",
            "|---|---|---|---|---|"]
    for g in pooled["per_group"]:
        rows.append(f"| `{g['dataset']}` {g['group']} | {', '.join(g['case_ids'])} | {names[g['chosen_point']]} | "
                    f"{_pct(g['mean_dice_other_groups'])} | {_pct(g['mean_dice_this_group'])} |")
    rows += ["", "| run | " + " | ".join(f"{n} labelled" for n in steps) + " | last - first |",
             "|---" * (len(steps) + 2) + "|"]
    for name, curve in pooled["nested"].items():
        points = [curve[n] for n in steps]
        rows.append(f"| `{name}`, pooled nested | " + " | ".join(_pct(d) for d in points) + f" | {_gain(points[0], points[-1])} |")
    return "\n".join(rows)


def _case_dice(folder: Path) -> dict[tuple[str, str], float]:
    import csv

    with open(folder / "cases.csv") as f:
        return {(r["case_id"], r["label_name"]): float(r["dice"]) for r in csv.DictReader(f) if r["dice"] not in ("", "nan")}


def compare(old: Path, new: Path) -> str:
    """Mean Dice of two runs on the query scans and labels both scored (mean over labels of the mean
    over scans), so a run on the first N queries compares with an older run on all of them."""
    a, b = _case_dice(old), _case_dice(new)
    common = sorted(set(a) & set(b))
    labels = sorted({lab for _, lab in common})
    cases = sorted({c for c, _ in common}, key=lambda c: (len(c), c))

    def mean(d):
        return 100 * sum(sum(d[(c, lab)] for c in cases if (c, lab) in d) / len(cases) for lab in labels) / len(labels)

    return f"| `{old.name}` vs `{new.name}` | {', '.join(cases)} | {mean(a):.1f} | {mean(b):.1f} | {mean(b) - mean(a):+.1f} |"


def points_table(folders: list[Path]) -> str:
    """One row per grid point of each nested-selection run: its mean Dice and per-label Dice (every point
    a full run on the same scans), then the nested figure and how many groups chose each point."""
    rows = ["| run | point | mean Dice | per label | nested | chosen by groups | mean HD95 (mm), nested |", "|---|---|---|---|---|---|---|"]
    for folder in folders:
        m = json.loads((folder / "metrics.json").read_text())
        selection = m.get("selection")
        if not selection:
            raise SystemExit(f"{folder}: not a --select run")
        chosen = [g["chosen_point"] for g in selection["per_group"]]
        for p in selection["points"]:
            point = ", ".join(f"{k.split('.')[-2]}.{k.split('.')[-1]}={v}" if k.count(".") else f"{k}={v}"
                              for k, v in p["overrides"].items())
            labels = ", ".join(f"{k} {_pct(v)}" for k, v in p["per_label_dice"].items())
            rows.append(f"| `{folder.name}` | {point} | {_pct(p['mean_dice'])} | {labels} | {_pct(m['mean_dice'])} | "
                        f"{chosen.count(p['point'])}/{len(chosen)} | {_mm(m.get('mean_hd95'))} |")
    return "\n".join(rows)


def _flat(settings, prefix: str = "") -> dict[str, object]:
    """Nested settings -> {"transfer.fusion.method": "joint", ...}."""
    if not isinstance(settings, dict):
        return {prefix: settings}
    out = {}
    for key, value in settings.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def settings_difference(reference: dict, other: dict) -> str:
    """The settings ``other`` ran with that ``reference`` did not, from both runs' metrics.json: what an
    ablation row turned off is read from the run itself, not from its folder's name."""
    a, b = _flat(reference), _flat(other)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "name")
    return ", ".join(f"`{k.removeprefix('transfer.')}={b.get(k)}`" for k in keys) or "the reference's settings"


def ablation_table(reference: Path, folders: list[Path]) -> str:
    """The reference run, then one row per run: its settings that differ, per-label Dice, mean Dice and its
    change from the reference. Every run must have scored the same query scans with the same supports."""
    r0, ref_cases = describe(reference), _case_dice(reference)
    labels = r0["labels"]
    rows = ["| variant | " + " | ".join(labels) + " | mean Dice | change | s / volume |", "|---" * (len(labels) + 4) + "|"]

    def row(name: str, r: dict, change: str) -> str:
        per_volume = "–" if r["s_per_volume"] is None else f"{r['s_per_volume']:.1f}"
        return (f"| {name} | " + " | ".join(_pct(r["dice"][lab]) for lab in labels)
                + f" | **{_pct(r['mean'])}** | {change} | {per_volume} |")

    rows.append(row(f"the reference, `{reference.name}`", r0, ""))
    for folder in folders:
        r = describe(folder)
        if set(_case_dice(folder)) != set(ref_cases) or r["supports"] != r0["supports"]:
            raise SystemExit(f"{folder}: other query scans or supports than {reference}; not an ablation of it")
        rows.append(row(settings_difference(r0["settings"], r["settings"]), r, f"{100 * (r['mean'] - r0['mean']):+.1f}"))
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--ablation":
        print(ablation_table(Path(argv[1]), [Path(a) for a in argv[2:]]))
        return 0
    if argv and argv[0] == "--points":
        print(points_table([Path(a) for a in argv[1:]]))
        return 0
    if argv and argv[0] == "--pooled":
        print(pooled_table([Path(a) for a in argv[1:]]))
        return 0
    if argv and argv[0] == "--compare":
        print("| runs (old vs new) | query scans | old mean Dice | new mean Dice | change |")
        print("|---|---|---|---|---|")
        for old, new in zip(argv[1::2], argv[2::2]):
            print(compare(Path(old), Path(new)))
        return 0
    if argv and argv[0] == "--growth":
        for a in argv[1:]:
            print(growth_table(Path(a)))
            print()
        return 0
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
