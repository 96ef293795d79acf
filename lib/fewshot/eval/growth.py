"""``--growth``: a curve of Dice against the number of labelled scans (1, 2, 4, 8).

One fixed query set, one fixed candidate pool, scans added in the order the ``bank_coverage`` strategy
proposes (``coverage.propose``) versus random orders (3 seeds). It is scored the clinical way.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np

from fewshot.eval import protocols
from fewshot.eval.results import finite, stats
from fewshot.eval.run import EvalRun, progress

logger = logging.getLogger(__name__)

RANDOM_SEEDS = 3  # random orders averaged on the growth curve


def run_growth(run: EvalRun, steps: Sequence[int] = protocols.GROWTH_STEPS, random_orders: int = RANDOM_SEEDS) -> dict:
    """Dice against labelled scans added in bank_coverage order, and in ``random_orders`` random orders."""
    ids = list(run.cases)
    first = protocols.growth_splits(ids, run.seed, steps)[0]
    all_queries = list(first.query_ids)
    queries = run.queries(all_queries)
    pool = sorted((i for i in ids if i not in set(all_queries)), key=protocols.scan_sort_key)
    usable = protocols.growth_steps(len(pool), steps)
    label_values = run.engine.label_values(run.values)
    batches: dict[str, object] = {}
    scored: dict[tuple[frozenset, str], float] = {}  # same bank, same query: same result
    logger.info("growth curve: pool %s, queries %s, steps %s", pool, queries, usable)

    embeddings: dict[str, np.ndarray] = {}

    def coverage_next(added: list[str]) -> str:
        from fewshot.coverage import propose

        remaining = [c for c in pool if c not in added]
        for c in remaining:
            if c not in embeddings:
                embeddings[c] = run.engine.embed_volume(run.cases[c].image)
        return propose(run.engine.bank, {c: embeddings[c] for c in remaining}).image_id

    def fixed_next(order: list[str]) -> Callable[[list[str]], str]:
        return lambda added: order[len(added)]

    strategies: dict[str, list[tuple[int, Callable]]] = {"bank_coverage": [(run.seed, coverage_next)]}
    strategies["random"] = [
        (s, fixed_next([pool[i] for i in np.random.default_rng(s).permutation(len(pool))]))
        for s in range(run.seed, run.seed + random_orders)
    ]
    if not random_orders:
        del strategies["random"]
    out = {"scoring": "clinical: whole scans, all labels, every slice; Dice per query scan = mean over labels",
           "pool_ids": pool, "query_ids": queries, "steps": usable, "strategies": {}}
    rows = []
    total = sum(len(runs) for runs in strategies.values()) * len(usable) * len(queries)
    with progress(total, "growth curve") as bar:
        for strategy, runs in strategies.items():
            points = {n: [] for n in usable}
            orders = []
            for seed, next_scan in runs:
                run.clear_bank()
                added: list[str] = []
                per_step = {}
                for n in usable:
                    while len(added) < n:
                        case_id = next_scan(added)
                        _put_cached(run, case_id, batches, label_values)
                        added.append(case_id)
                    case_means = []
                    for q in queries:
                        key = (frozenset(added), q)
                        if key not in scored:
                            scored[key] = run.segment_and_score(-1, tuple(added), q).mean_dice()
                        case_means.append(scored[key])
                        rows.append({"strategy": strategy, "seed": seed, "n_labelled": n, "case_id": q,
                                     "dice": scored[key], "support_ids": " ".join(added)})
                        bar.update(1)
                    points[n].extend(case_means)
                    per_step[n] = float(np.nanmean(case_means)) if len(finite(case_means)) else math.nan
                orders.append({"seed": seed, "order": list(added), "dice_by_step": per_step})
                logger.info("growth %s (seed %d): order %s, Dice %s", strategy, seed, added,
                            {n: round(d, 3) for n, d in per_step.items()})
            out["strategies"][strategy] = {
                "runs": orders,
                "points": [dict(zip(("n_labelled", "dice_mean", "dice_std", "n"), (n, *stats(points[n]))))
                           for n in usable],
            }
    run.clear_bank()
    out["rows"] = rows
    return out


def _put_cached(run: EvalRun, case_id: str, cache: dict, label_values: Sequence[int]) -> None:
    """Add a scan to the bank, computing its entries once per run (the orders re-add the same scans)."""
    if case_id not in cache:
        from fewshot.volume import label_to_canvas, read_label, read_volume

        case = run.cases[case_id]
        volume = read_volume(case.image)
        prepared = run.engine.prepare(volume)
        masks = label_to_canvas(read_label(case.label, volume), prepared.geometry)
        cache[case_id] = run.engine.support_batch(case_id, prepared, masks, label_values)
    case = run.cases[case_id]
    run.engine.bank.put(case_id, cache[case_id], {"image": case.image, "label": case.label})
