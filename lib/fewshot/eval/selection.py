"""``--select``: a grid of preset overrides, every point evaluated, each group of query scans reported
at the point chosen on the OTHER groups (nested selection), so no scan tunes the setting it is scored with."""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np

from fewshot.config import ConfigError
from fewshot.eval import protocols
from fewshot.eval.results import CaseResult, stats, summarise

logger = logging.getLogger(__name__)

SELECTION_GROUPS = 5  # clinical: query scans are split into this many groups for nested selection


def _top_level_split(text: str) -> list[str]:
    """'1,[0.25,0.5,0.25],[1]' -> ['1', '[0.25,0.5,0.25]', '[1]']: commas inside brackets stay."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def parse_select(items: Sequence[str] | None) -> dict[str, list]:
    """['embedder.pca_dims=16,32,64', ...] -> {'embedder.pca_dims': [16, 32, 64], ...} (YAML values;
    a list value is written in brackets: 'transfer.consistency.z_weights=[1],[0.25,0.5,0.25]')."""
    from fewshot.config import parse_value

    grid: dict[str, list] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--select {item!r} must look like KEY=V1,V2,...")
        key, values = (t.strip() for t in item.split("=", 1))
        parsed = [parse_value(v.strip()) for v in _top_level_split(values) if v.strip()]
        if not key or not parsed:
            raise ConfigError(f"--select {item!r} names no key or no values")
        if key in grid:
            raise ConfigError(f"--select names {key!r} twice")
        if len(set(map(repr, parsed))) != len(parsed):
            raise ConfigError(f"--select {key!r} repeats a value")
        grid[key] = parsed
    return grid


def grid_points(grid: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the grid's values, in a fixed order (the first key varies slowest)."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else [{}]


def selection_score(rows: Sequence[tuple[str, int, float]]) -> float:
    """(case, label, dice) rows -> mean over labels of the per-label mean over cases: the headline's rule."""
    by_label: dict[int, list[float]] = {}
    for _, label, d in rows:
        if math.isfinite(d):
            by_label.setdefault(label, []).append(d)
    means = [float(np.mean(v)) for v in by_label.values() if v]
    return float(np.mean(means)) if means else math.nan


def nested_select(rows: Sequence[tuple[int, int, str, int, float]]) -> dict[int, dict]:
    """Nested selection over (point, group, case, label, dice) rows.

    For each group, the grid point with the best ``selection_score`` on the OTHER groups' rows is
    chosen (ties: the earlier point), and the group is reported at that point, so no group's own
    scores ever influence the setting it is scored with. -> group -> {"point", "score_other_groups",
    "score_this_group"}.
    """
    points = sorted({r[0] for r in rows})
    groups = sorted({r[1] for r in rows})
    if len(groups) < 2:
        raise ValueError("nested selection needs at least two groups of query scans")
    out = {}
    for g in groups:
        best, best_score = None, -math.inf
        for p in points:
            score = selection_score([(c, lb, d) for pp, gg, c, lb, d in rows if pp == p and gg != g])
            if math.isfinite(score) and score > best_score:
                best, best_score = p, score
        if best is None:
            raise ValueError(f"group {g}: no grid point has a finite Dice on the other groups")
        own = selection_score([(c, lb, d) for pp, gg, c, lb, d in rows if pp == best and gg == g])
        out[g] = {"point": best, "score_other_groups": best_score, "score_this_group": own}
    return out


def round_robin(case_ids) -> dict[str, int]:
    """case id -> selection group: the scans sorted by id and dealt round-robin into ``SELECTION_GROUPS`` groups."""
    ids = sorted(set(case_ids), key=protocols.scan_sort_key)
    n = min(SELECTION_GROUPS, len(ids))
    return {cid: i % n for i, cid in enumerate(ids)}


def round_robin_groups(results: Sequence[CaseResult]) -> dict[tuple[int, str], int]:
    """(fold, case id) -> selection group, by ``round_robin`` (a scan is in one group in every split)."""
    rank = round_robin(r.case_id for r in results)
    return {(r.fold, r.case_id): rank[r.case_id] for r in results}


def nested_results(runs: Sequence[Sequence[CaseResult]], points: list[dict], grid: Mapping, protocol,
                   name_of) -> tuple[list[CaseResult], dict]:
    """Each group's results at the grid point chosen on the other groups, and what metrics.json records.
    ``runs``: the results of each grid point; ``protocol`` says what the groups are."""
    all_results = [r for run in runs for r in run]
    group_of = protocol.selection_groups(all_results)
    rows = [(p, group_of[(r.fold, r.case_id)], f"{r.fold}/{r.case_id}", v, s.dice)
            for p, run in enumerate(runs) for r in run for v, s in r.scores.items()]
    choice = nested_select(rows)
    nested, point_of, per_group = [], {}, []
    for g, c in sorted(choice.items()):
        mine = [r for r in runs[c["point"]] if group_of[(r.fold, r.case_id)] == g]
        nested.extend(mine)
        point_of.update({(r.fold, r.case_id): c["point"] for r in mine})
        per_group.append({"group": g, "case_ids": sorted({r.case_id for r in mine}, key=protocols.scan_sort_key),
                          "chosen_point": c["point"], "chosen": points[c["point"]],
                          "mean_dice_other_groups": c["score_other_groups"],
                          "mean_dice_this_group": c["score_this_group"]})
        logger.info("selection group %d: chose %s (mean Dice %.3f on the other groups, %.3f here)", g,
                    points[c["point"]], c["score_other_groups"], c["score_this_group"])
    nested.sort(key=lambda r: (r.fold, protocols.scan_sort_key(r.case_id)))
    point_means = []
    for p, run in enumerate(runs):
        summary = summarise(run, name_of)
        point_means.append({"point": p, "overrides": points[p], "mean_dice": summary["mean_dice"],
                            "per_label_dice": {k: v["dice_mean"] for k, v in summary["per_label"].items()}})
    selection = {
        "grid": dict(grid),
        "groups": protocol.selection_groups_note,
        "rule": "for each group, the point with the best mean Dice (mean over labels of the mean over scans) on "
                "the OTHER groups' query scans; the group is reported at that point (ties: the earlier point)",
        "headline": "per_label, mean_dice and cases.csv are the nested figures",
        "per_group": per_group,
        "points": point_means,
        "points_note": "each point's mean over ALL groups: picking the best of these would tune on the scored "
                       "scans, so they are shown for inspection only, never as a result",
        "_point_of": point_of,
    }
    return nested, selection


GROWTH_STRATEGY = "bank_coverage"  # the order the product follows: the one a growth selection is made on


def _orders(orders: list[list[str]]) -> dict:
    """The scans' order of one growth run at every grid point: one ``order`` when the points agree (settings
    of the transfer leave bank_coverage's proposals as they are), else each point's."""
    if all(order == orders[0] for order in orders):
        return {"order": orders[0]}
    return {"order": None, "orders_by_point": orders}


def nested_growth(growths: Sequence[dict], points: list[dict], grid: Mapping) -> dict:
    """``--select`` with ``--growth``: each group of query scans (``round_robin``) gets
    the grid point whose ``bank_coverage`` curve is best on the OTHER groups' scans (mean over the steps of
    the per-step mean Dice, so every bank size counts alike), and its rows at every step and in every order
    are that point's. A setting that helps small banks and hurts large ones, or the reverse, is judged on
    the whole curve. ``growths``: each point's ``run_growth`` result, rows included. -> the nested growth
    result (the same keys; its rows say which point they come from) with the choice under ``selection``."""
    queries = sorted(growths[0]["query_ids"], key=protocols.scan_sort_key)
    group_of = round_robin(queries)
    n_groups = len(set(group_of.values()))
    rows = [(p, group_of[r["case_id"]], r["case_id"], r["n_labelled"], r["dice"])
            for p, growth in enumerate(growths) for r in growth["rows"] if r["strategy"] == GROWTH_STRATEGY]
    choice = nested_select(rows)
    point_of = {q: choice[group_of[q]]["point"] for q in queries}
    nested_rows = [{**r, "selected_point": p} for p, growth in enumerate(growths) for r in growth["rows"]
                   if point_of[r["case_id"]] == p]
    out = {k: v for k, v in growths[0].items() if k not in ("rows", "strategies")}
    out["strategies"] = {}
    for strategy, data in growths[0]["strategies"].items():
        mine = [r for r in nested_rows if r["strategy"] == strategy]
        out["strategies"][strategy] = {
            "runs": [{"seed": run["seed"], **_orders([g["strategies"][strategy]["runs"][i]["order"] for g in growths]),
                      "dice_by_step": {n: float(np.nanmean([r["dice"] for r in mine if r["seed"] == run["seed"]
                                                            and r["n_labelled"] == n] or [math.nan]))
                                       for n in out["steps"]}}
                     for i, run in enumerate(data["runs"])],
            "points": [dict(zip(("n_labelled", "dice_mean", "dice_std", "n"),
                                (n, *stats([r["dice"] for r in mine if r["n_labelled"] == n])))) for n in out["steps"]],
        }
    per_group = [{"group": g, "case_ids": [q for q in queries if group_of[q] == g], "chosen_point": c["point"],
                  "chosen": points[c["point"]], "mean_dice_other_groups": c["score_other_groups"],
                  "mean_dice_this_group": c["score_this_group"]} for g, c in sorted(choice.items())]
    for group in per_group:
        logger.info("growth selection group %d (%s): chose %s (mean Dice over the curve %.3f on the other groups, "
                    "%.3f here)", group["group"], ", ".join(group["case_ids"]), group["chosen"],
                    group["mean_dice_other_groups"], group["mean_dice_this_group"])
    out["selection"] = {
        "grid": dict(grid),
        "groups": f"growth query scans sorted by id, dealt round-robin into {n_groups} groups",
        "rule": f"for each group, the point whose {GROWTH_STRATEGY} curve (mean over steps of the mean Dice over "
                "scans) is best on the OTHER groups' query scans; the group is reported at that point at every "
                "step and in every order (ties: the earlier point)",
        "per_group": per_group,
        "points": [{"point": p, "overrides": points[p],
                    "curve": {pt["n_labelled"]: pt["dice_mean"] for pt in g["strategies"][GROWTH_STRATEGY]["points"]}}
                   for p, g in enumerate(growths)],
        "points_note": "each point's curve over ALL query scans: picking the best of these would tune on the scored "
                       "scans, so they are shown for inspection only, never as a result",
    }
    out["rows"] = nested_rows
    return out


def pooled_growth_selection(grids: Mapping[str, Sequence[Mapping]]) -> dict:
    """Nested selection of one setting for several datasets: every dataset's growth query scans dealt into its
    ``round_robin`` groups, and each group reported at the grid point whose ``bank_coverage`` curve (mean over
    steps of the per-step mean Dice) is best on ALL the other groups, its own dataset's and the others'. A default
    serves every dataset, so it is chosen on all of them, and no group's scores choose its own setting.
    ``grids``: dataset name -> its run's ``growth_grid.csv`` rows (point, strategy, n_labelled, case_id, dice),
    the same grid in each. -> {"per_group": [{dataset, group, case_ids, chosen_point, mean_dice_other_groups,
    mean_dice_this_group}], "curves": {dataset: {point: {n_labelled: mean Dice}}}, "nested": {dataset:
    {n_labelled: mean Dice}}}."""
    rows, groups, curves, cases_of = [], {}, {}, {}
    ordered = {name: [r for r in grid if r["strategy"] == GROWTH_STRATEGY] for name, grid in grids.items()}
    steps_of = {name: sorted({int(r["n_labelled"]) for r in mine}) for name, mine in ordered.items()}
    if len({tuple(steps) for steps in steps_of.values()}) > 1:  # a step only some have would weigh as a whole step
        raise ValueError(f"pooled selection needs the same growth steps in every run: {steps_of}")
    for name, mine in ordered.items():
        group_of = round_robin(r["case_id"] for r in mine)
        for r in mine:
            g = groups.setdefault((name, group_of[r["case_id"]]), len(groups))
            cases_of.setdefault(g, set()).add(r["case_id"])
            rows.append((int(r["point"]), g, f"{name}/{r['case_id']}", int(r["n_labelled"]), float(r["dice"])))
        curves[name] = {p: {n: float(np.nanmean([float(r["dice"]) for r in mine
                                                  if int(r["point"]) == p and int(r["n_labelled"]) == n]))
                            for n in steps_of[name]} for p in sorted({int(r["point"]) for r in mine})}
    choice = nested_select(rows)
    name_of = {g: key for key, g in groups.items()}
    per_group = [{"dataset": name_of[g][0], "group": name_of[g][1],
                  "case_ids": sorted(cases_of[g], key=protocols.scan_sort_key), "chosen_point": c["point"],
                  "mean_dice_other_groups": c["score_other_groups"], "mean_dice_this_group": c["score_this_group"]}
                 for g, c in sorted(choice.items())]
    nested = {}
    for name in grids:
        chosen = {f"{name}/{q}": c["point"] for g, c in choice.items() if name_of[g][0] == name for q in cases_of[g]}
        mine = [r for r in rows if r[2] in chosen and r[0] == chosen[r[2]]]
        nested[name] = {n: float(np.nanmean([r[4] for r in mine if r[3] == n])) for n in sorted({r[3] for r in mine})}
    return {"per_group": per_group, "curves": curves, "nested": nested}
