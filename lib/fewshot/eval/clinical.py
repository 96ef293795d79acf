"""The ``clinical`` protocol: the tool's real use.

``--shots`` scans are ingested into an in-memory bank and every other scan is segmented whole with all
labels through ``Engine.segment``; every slice is scored, so false positives on organ-free slices
count. Dice and HD95 per label per scan; ``--folds`` random support draws.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from fewshot.eval import protocols
from fewshot.eval.datasets import DatasetConfig
from fewshot.eval.results import CaseResult
from fewshot.eval.run import EvalRun, progress
from fewshot.eval.selection import SELECTION_GROUPS, round_robin_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClinicalProtocol:
    """``shots`` labelled scans in the bank, drawn with ``seed`` (then seed + 1, ... per split)."""

    shots: int = 1
    seed: int = 0
    max_queries: int | None = None  # scored per split (``--max-queries``): the first ones of each split's queries

    name = "clinical"
    default_folds = 1
    fold_column = "support_labelled_slices"
    fold_note = "support_labelled_slices: slices per organ labelled in the support bank"
    selection_groups_note = f"query scans sorted by id, dealt round-robin into {SELECTION_GROUPS} groups"

    def check(self, case_ids: Sequence[str], n_folds: int, selecting: bool) -> None:
        """Fails at once on an impossible split, before any network loads."""
        splits = self.splits(case_ids, self.seed, max(1, n_folds))
        scored = {q for _, query_ids in splits for q in query_ids[: self.max_queries or None]}
        if selecting and len(scored) < 2:  # the groups are scans: one scan scored, in every split, is one group
            raise ValueError("--select needs at least 2 query scans (it selects on the other scans)"
                             + (f"; --max-queries {self.max_queries} scores {len(scored)}" if self.max_queries else ""))

    def splits(self, case_ids, seed: int, n: int) -> list[tuple[list[str], list[str]]]:
        """The ``n`` random support draws, (support ids, query ids) each: seed, seed + 1, ...; the check counts the
        same queries the run scores."""
        return [protocols.clinical_split(list(case_ids), self.shots, seed + i) for i in range(n)]

    def info(self, n_folds: int, dataset: DatasetConfig | None) -> dict:
        """metrics.json's ``protocol_settings``."""
        return {"shots": self.shots, "splits": n_folds, "seed": self.seed,
                "scored": "whole scans, all labels, every slice; Dice undefined (null) when a label is "
                          "absent from both reference and prediction"}

    @staticmethod
    def selection_groups(results: Sequence[CaseResult]) -> dict[tuple[int, str], int]:
        return round_robin_groups(results)

    def run(self, run: EvalRun, n_splits: int) -> tuple[list[CaseResult], list[dict]]:
        """Every split's queries, scored; and the fold table's rows."""
        splits = self.splits(run.cases, run.seed, n_splits)
        results, fold_info = [], []
        jobs = sum(len(run.queries(q)) for _, q in splits)
        with progress(jobs, "clinical queries") as bar:
            for index, (support_ids, query_ids) in enumerate(splits):
                run.clear_bank()
                logger.info("split %d: support bank %s, queries %s", index, support_ids, query_ids)
                for sid in support_ids:
                    case = run.cases[sid]
                    run.engine.ingest(sid, case.image, case.label)
                per_label = run.engine.bank.stats()["per_label"]
                queries = run.queries(query_ids)
                for query_id in queries:
                    results.append(run.segment_and_score(index, support_ids, query_id))
                    bar.update(1)
                # Clinical supports are whole labelled scans: the table counts their labelled slices per organ.
                fold_info.append({"index": index, "seed": run.seed + index, "support_ids": list(support_ids),
                                  "query_ids": queries,
                                  "support_slices": {run.name_of[v]: int(per_label.get(str(v), 0))
                                                     for v in run.values}})
        return results, fold_info
