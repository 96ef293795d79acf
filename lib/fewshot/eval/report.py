"""What eval writes besides metrics.json: cases.csv, the fold table (folds.csv, folds.md) and the
PNG figures (per-label scores, best and worst overlays, the growth curve)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

from fewshot.eval.results import CaseResult

MONTAGE_CASES = 2  # best and worst cases each shown in the overlay montage


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case_id"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return path


def montage_cases(results: Sequence[CaseResult], count: int = MONTAGE_CASES) -> list[tuple[str, CaseResult]]:
    """The ``count`` best and worst cases by mean Dice over labels (each case shown once)."""
    ranked = sorted((r for r in results if r.preview is not None and math.isfinite(r.mean_dice())),
                    key=lambda r: r.mean_dice(), reverse=True)
    count = min(count, max(1, len(ranked) // 2))
    best = ranked[:count]
    shown = {id(r) for r in best}  # identity: results hold arrays, so == is not usable
    worst = [r for r in ranked[::-1][:count] if id(r) not in shown]
    return [("best", r) for r in best] + [("worst", r) for r in worst[::-1]]


def write_plots(out: Path, results: Sequence[CaseResult], rows: list[dict], growth: dict | None,
                name_of: Mapping[int, str], title: str) -> dict[str, Path]:
    from fewshot import plots

    files = {}
    if rows:
        files["boxplot"] = plots.box_plot_per_label(rows, out / "dice_per_label.png", title=f"{title}: per-case scores",
                                                    label_names=dict(name_of))
    chosen = montage_cases(results)
    if chosen:
        panels = [(f"{kind}: {r.case_id} (fold {r.fold})\nmean Dice {r.mean_dice():.3f}, slice {r.preview.slice_index}",
                   r.preview.image, r.preview.truth, r.preview.prediction) for kind, r in chosen]
        files["montage"] = plots.overlay_montage(panels, out / "overlays_best_worst.png",
                                                 title=f"{title}: best and worst cases", label_names=dict(name_of))
    if growth and growth["steps"]:
        curves = {}
        for strategy, data in growth["strategies"].items():
            label = f"{strategy} (mean of {len(data['runs'])} seeds)" if len(data["runs"]) > 1 else strategy
            curves[label] = [(p["n_labelled"], p["dice_mean"], p["dice_std"]) for p in data["points"]
                             if p["dice_mean"] is not None and math.isfinite(p["dice_mean"])]
        files["growth"] = plots.growth_curve(curves, out / "growth_curve.png",
                                             title=f"{title}: Dice as labelled scans are added")
    return files


def fold_table(folds: Sequence[Mapping], protocol) -> list[dict]:
    """One row per fold: support scan(s), query scans, support slices per organ (alpnet: the slice
    indices, canvas z; clinical: the count of labelled slices in the bank), in ``protocol.fold_column``."""
    rows = []
    for f in folds:
        slices = f.get("support_slices", {})
        text = "; ".join(f"{name}: {' '.join(map(str, zs)) if isinstance(zs, list) else zs}"
                         for name, zs in slices.items())
        rows.append({"fold": f["index"], "support_ids": " ".join(f["support_ids"]),
                     "query_ids": " ".join(f["query_ids"]),
                     protocol.fold_column: text})
    return rows


def write_fold_table(out: Path, rows: list[dict], protocol) -> tuple[Path, Path]:
    csv_path = write_csv(out / "folds.csv", rows)
    header = list(rows[0]) if rows else ["fold"]
    lines = [f"# Folds ({protocol.name})", "", protocol.fold_note, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[k]) for k in header) + " |" for r in rows]
    md_path = out / "folds.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
