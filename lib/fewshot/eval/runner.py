"""``run_eval``: one evaluation from plan to files. The rooms it draws on:

* ``plan``: ``EvalPlan``, what is asked, checked first;
* ``datasets``: dataset files, scans and references;
* ``run``: the engine, the scans and scoring shared by every protocol;
* ``alpnet``, ``clinical`` (protocols as objects, their rules as data in ``protocols``) and ``growth``;
* ``selection``: ``--select``'s nested selection over a grid of settings;
* ``results`` and ``report``: the summaries, metrics.json, cases.csv, the fold table and the figures.

Scoring happens on the native voxel grid, reoriented to RAS with the slicing axis first so that
slice indices are the canvas's, with the volume's own spacing for HD95 (mm). ``python -m fewshot
eval --help`` (``fewshot.cli.eval``) describes the protocols for users.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from fewshot.config import parse_label_map, parse_overrides
from fewshot.eval import protocols
from fewshot.eval.datasets import Case, dataset_for, label_values_in
from fewshot.eval.growth import run_growth
from fewshot.eval.plan import EvalPlan
from fewshot.eval.report import fold_table, write_csv, write_fold_table, write_plots
from fewshot.eval.results import case_rows, fold_summaries, json_safe, summarise, timing_summary
from fewshot.eval.run import EvalRun
from fewshot.eval.selection import grid_points, nested_growth, nested_results

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    metrics: dict
    out_dir: Path
    files: dict[str, Path]


def run_protocol(settings: Mapping, cases, label_map, plan: EvalPlan, n_folds: int) -> tuple:
    """One engine, one full protocol run -> (results, fold_info, growth or None, engine settings, seconds of
    the engine's start by part)."""
    from fewshot.engine import Engine

    engine, _ = Engine.from_settings(settings, bank_dir=None, models_dir=plan.models_dir, label_names=label_map)
    try:
        # As the server does at start-up: worker processes and compiled loops are not any one scan's time.
        start = engine.warm()
        if start:
            logger.info("engine started in %.1f s (%s), before the first scan", sum(start.values()),
                        ", ".join(f"{k} {v:.1f} s" for k, v in start.items()))
        run = EvalRun(engine, cases, label_map, max_queries=plan.max_queries, seed=plan.seed)
        results, fold_info = plan.protocol_rules().run(run, n_folds)
        growth_out = run_growth(run, plan.growth_steps, plan.growth_random) if plan.growth else None
    finally:
        close = getattr(engine.transfer, "close", None)  # e.g. the registration worker pool
        if close:
            close()
    return results, fold_info, growth_out, engine.settings, start


def start_timing(timing: dict, starts: list[dict[str, float]]) -> dict:
    """The timing summary with the engine's start (``Engine.warm``) per grid point, kept apart from the scans'."""
    timing["start_seconds"] = [sum(start.values()) for start in starts]
    timing["what"]["start_seconds"] = ("seconds starting the engine before the first scan (worker processes, compiled "
                                       "loops; the server does it at start-up), per grid point: in no scan's time")
    return timing


def run_eval(data_dir: str | Path, protocol: str, preset: str, out_dir: str | Path, **options) -> EvalReport:
    """Evaluate ``preset`` on the ``image_N``/``label_N`` pairs of ``data_dir``; write OUT/metrics.json,
    OUT/cases.csv, OUT/folds.{csv,md} and PNG plots. ``options``: the other fields of ``EvalPlan``."""
    return evaluate(EvalPlan(data_dir, protocol, preset, out_dir, **options))


def evaluate(plan: EvalPlan) -> EvalReport:
    from fewshot.config import load_preset
    from fewshot.folders import scan_pairs

    started = time.perf_counter()
    plan.check()
    data_dir, preset = plan.data_dir, plan.preset
    grid = plan.grid()
    pairs = scan_pairs(data_dir)
    if len(pairs) < 2:
        raise ValueError(f"{data_dir}: found {len(pairs)} image_N/label_N pairs; evaluation needs at least 2")
    cases = [Case(cid, img, lab) for cid, (img, lab) in pairs.items()]

    ds = dataset_for(data_dir, plan.dataset)
    merged = dict(ds.overrides()) if ds else {}
    overrides = plan.overrides
    merged.update(parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else dict(overrides or {}))
    if plan.device:
        merged["device"] = plan.device
    points = grid_points(grid)
    settings = [load_preset(preset, {**merged, **point}) for point in points]  # every point checked up front

    label_map = parse_label_map(plan.labels) or (dict(ds.labels) if ds else {})
    if not label_map:
        label_map = {str(v): v for v in label_values_in(cases)}
        logger.info("no label names given: evaluating every value found in the labels, %s", sorted(label_map.values()))
    if not label_map:
        raise ValueError(f"{data_dir}: the labels hold no foreground values")

    # Splits are checked before the networks load, so an impossible request fails at once.
    protocol = plan.protocol_rules()
    n_folds = plan.n_folds()
    protocol.check([c.case_id for c in cases], n_folds, bool(grid))
    if plan.growth:
        plan.check_growth([c.case_id for c in cases])
    name_of = {v: n for n, v in label_map.items()}

    runs = []
    for i, (point, point_settings) in enumerate(zip(points, settings)):
        if grid:
            logger.info("grid point %d/%d: %s", i + 1, len(points), point)
        runs.append(run_protocol(point_settings, cases, label_map, plan, n_folds))
    results, fold_info, growth_out, engine_settings, _ = runs[0]
    selection = None
    growth_grid_rows = []
    if grid:
        results, selection = nested_results([run[0] for run in runs], points, grid, protocol, name_of)
        engine_settings = load_preset(preset, merged)  # the preset before the grid's overrides
        if plan.growth:
            growth_grid_rows = [{"point": p, **row} for p, run in enumerate(runs) for row in run[2]["rows"]]
            growth_out = nested_growth([run[2] for run in runs], points, grid)

    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = case_rows(results, name_of, plan.hd95_empty)
    if selection is not None:
        chosen = {(r.fold, r.case_id): selection["_point_of"][(r.fold, r.case_id)] for r in results}
        for row in rows:
            row["selected_point"] = chosen[(row["fold"], row["case_id"])]
    files = {"cases": write_csv(out / "cases.csv", rows)}
    if selection is not None:
        grid_rows = []
        for index, (point_results, *_rest) in enumerate(runs):
            for row in case_rows(point_results, name_of, plan.hd95_empty):
                grid_rows.append({"point": index, **row})
        files["grid_cases"] = write_csv(out / "cases_grid.csv", grid_rows)
        selection.pop("_point_of")
    table = fold_table(fold_info, protocol)
    files["folds_csv"], files["folds_md"] = write_fold_table(out, table, protocol)
    for row in table:
        logger.info("fold %s: support %s | queries %s | %s", row["fold"], row["support_ids"], row["query_ids"],
                    row.get("support_slices", row.get("support_labelled_slices")))
    if growth_out is not None:
        files["growth_cases"] = write_csv(out / "growth.csv", growth_out.pop("rows"))
    if growth_grid_rows:
        files["growth_grid_cases"] = write_csv(out / "growth_grid.csv", growth_grid_rows)
    title = f"{Path(data_dir).name}, {preset}, {protocol.name}" + (" (nested selection)" if grid else "")
    files.update(write_plots(out, results, rows, growth_out, name_of, title))

    metrics = {
        "protocol": protocol.name,
        "preset": preset,
        "data": str(Path(data_dir).resolve()),
        "dataset": asdict(ds) if ds else None,
        "labels": label_map,
        **summarise(results, name_of, plan.hd95_empty),
        "protocol_settings": protocol.info(n_folds, ds),
        "folds": fold_summaries(results, fold_info, name_of),
        "n_cases": len(results),
        "selection": selection,
        "timing": start_timing(timing_summary([r for run in runs for r in run[0]]), [run[4] for run in runs]),
        "growth": growth_out,
        "settings": engine_settings,
        "max_queries": plan.max_queries,
        "elapsed_seconds": time.perf_counter() - started,
        "files": {k: p.name for k, p in files.items()},
    }
    files["metrics"] = out / "metrics.json"
    metrics["files"]["metrics"] = "metrics.json"
    files["metrics"].write_text(json.dumps(json_safe(metrics), indent=1, default=str))
    logger.info("%s on %s with %s: mean Dice %.3f over %d labels%s; wrote %s", protocol.name, Path(data_dir).name,
                preset, metrics["mean_dice"], len(metrics["per_label"]), " (nested selection)" if grid else "", out)
    return EvalReport(metrics=metrics, out_dir=out, files=files)
