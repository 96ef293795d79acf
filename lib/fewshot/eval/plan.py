"""``EvalPlan``: everything one evaluation is asked to do, checked before any scan is read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from fewshot.eval import protocols
from fewshot.eval.alpnet import ALPNET_PAIRINGS, ALPNET_SUPPORTS, AlpnetProtocol
from fewshot.eval.clinical import ClinicalProtocol
from fewshot.eval.growth import RANDOM_SEEDS
from fewshot.eval.results import HD95_EMPTY
from fewshot.eval.selection import parse_select

PROTOCOLS = ("alpnet", "clinical")


@dataclass
class EvalPlan:
    """A preset on the ``image_N``/``label_N`` pairs of ``data_dir`` under ``protocol``, written to ``out_dir``.
    ``folds``: alpnet folds (default 5) or clinical random splits (default 1). ``select``: a grid of
    preset overrides chosen by nested cross-validation. ``labels``: names and values (default: the
    dataset file's, else every value found)."""

    data_dir: str | Path
    protocol: str
    preset: str
    out_dir: str | Path
    labels: str | Mapping[str, int] | None = None
    folds: int | None = None
    shots: int = 1
    growth: bool = False
    growth_steps: Sequence[int] = protocols.GROWTH_STEPS
    models_dir: str | Path | None = None
    overrides: Mapping | Sequence[str] | None = None
    max_queries: int | None = None
    dataset: str | None = None
    seed: int = 0
    device: str | None = None
    chunks: int = 3
    fold_convention: str = "alpnet"
    select: Mapping[str, Sequence] | Sequence[str] | None = field(default=None)
    hd95_empty: str = "exclude"
    alpnet_support: str = "slices"
    alpnet_pairing: str = "chunk"
    growth_random: int = RANDOM_SEEDS

    def check(self) -> None:
        """The request's own mistakes, before anything is read."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError("--max-queries must be at least 1")
        if self.growth_random < 0:
            raise ValueError("--growth-random must be 0 or more")
        if self.alpnet_support not in ALPNET_SUPPORTS:
            raise ValueError(f"unknown --alpnet-support {self.alpnet_support!r}; use one of {', '.join(ALPNET_SUPPORTS)}")
        if self.alpnet_pairing not in ALPNET_PAIRINGS:
            raise ValueError(f"unknown --alpnet-pairing {self.alpnet_pairing!r}; use one of {', '.join(ALPNET_PAIRINGS)}")
        if self.alpnet_pairing != "chunk" and (self.protocol != "alpnet" or self.alpnet_support != "slices"):
            raise ValueError("--alpnet-pairing pairs the protocol's support slices with query slices: it needs "
                             "--protocol alpnet and --alpnet-support slices")
        if self.hd95_empty not in HD95_EMPTY:
            raise ValueError(f"unknown --hd95-empty {self.hd95_empty!r}; use one of {', '.join(HD95_EMPTY)}")

    def check_growth(self, case_ids: Sequence[str]) -> None:
        """The growth split is possible, and, with ``--select``, scores at least two query scans: nested
        selection chooses each group's setting on the others, and otherwise would fail only after every grid
        point has run."""
        splits = protocols.growth_splits(list(case_ids), self.seed, self.growth_steps)
        queries = len(splits[0].query_ids) if splits else 0
        scored = min(queries, self.max_queries) if self.max_queries else queries
        if self.select and scored < 2:
            raise ValueError(f"--select with --growth needs at least 2 growth query scans; {len(case_ids)} scans "
                             f"leave {queries} beside the labelled pool"
                             + (f", and --max-queries {self.max_queries} scores {scored}" if scored < queries else ""))

    def grid(self) -> dict[str, list]:
        return dict(self.select) if isinstance(self.select, Mapping) else parse_select(self.select)

    def protocol_rules(self) -> AlpnetProtocol | ClinicalProtocol:
        """The protocol as an object: how it splits, runs, groups for selection and describes itself."""
        if self.protocol == "alpnet":
            return AlpnetProtocol(chunks=self.chunks, convention=self.fold_convention, support=self.alpnet_support,
                                  pairing=self.alpnet_pairing)
        return ClinicalProtocol(shots=self.shots, seed=self.seed, max_queries=self.max_queries)

    def n_folds(self) -> int:
        return self.protocol_rules().default_folds if self.folds is None else self.folds
