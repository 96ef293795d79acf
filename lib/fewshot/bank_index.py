"""The faiss index a SupportBank is searched with: exact inner product up to
``approximate_above`` entries, HNSW above, behind the embedder's transform (a PCA fitted on the bank
keeps at most half as many dimensions as entries). ``IndexSettings`` is the ``bank`` section's part
for it, typed and checked once; ``build_index`` is a module function so the benchmark times the very
index the bank builds.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from typing import Mapping

import faiss
import numpy as np

logger = logging.getLogger(__name__)

MIN_PCA_DIMS = 4  # below this a PCA of the bank says little: search the normalised vectors instead


def index_spec(n: int, index_transform: str = "", approximate_above: int = 20000, hnsw_m: int = 32) -> str:
    """The faiss index_factory string a bank of ``n`` vectors is searched with.

    A PCA transform (``PCAW64,...``) is fitted on the bank itself, so it keeps at most n // 2
    dimensions: few-shot banks (tens of entries) are still whitened, just in fewer dimensions.
    """
    transform = index_transform or ""
    match = re.match(r"PCA(W?)(\d+)", transform)
    if match:
        dims = min(int(match.group(2)), n // 2)
        rest = transform[match.end():].lstrip(",")
        transform = f"PCA{match.group(1)}{dims}" + (f",{rest}" if rest else "") if dims >= MIN_PCA_DIMS else rest or "L2norm"
    body = f"HNSW{hnsw_m}" if n > approximate_above else "Flat"
    return f"{transform},{body}" if transform else body


@dataclass(frozen=True)
class IndexSettings:
    """The ``bank`` section's index settings, typed and checked once. The defaults are
    ``configs/presets/foundation.yaml``'s, which every preset inherits (it says why 256)."""

    approximate_above: int = 20000  # exact inner-product search up to this many entries, HNSW above
    hnsw_m: int = 32
    hnsw_ef_search: int = 256

    @classmethod
    def from_settings(cls, bank: Mapping) -> "IndexSettings":
        from fewshot.config import ConfigError

        values = {f.name: bank.get(f.name, f.default) for f in fields(cls)}
        bad = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"bank.{bad[0]} must be a positive integer, not {values[bad[0]]!r}")
        return cls(**values)


def build_index(
    data: np.ndarray,
    index_transform: str = "",
    approximate_above: int = IndexSettings.approximate_above,
    hnsw_m: int = IndexSettings.hnsw_m,
    hnsw_ef_search: int = IndexSettings.hnsw_ef_search,
):
    """The faiss inner-product index a SupportBank searches over ``data`` (N, D): (index, spec).

    Exact (Flat) up to ``approximate_above`` vectors, HNSW above; ``index_transform`` is the
    embedder's faiss prefix. A module function so the benchmark times the very index the bank builds.
    """
    n, d = data.shape
    spec = index_spec(n, index_transform, approximate_above, hnsw_m)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(data)
    if "HNSW" in spec:
        hnsw = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
        hnsw.hnsw.efSearch = hnsw_ef_search
    index.add(data)
    logger.debug("support bank index %s over %d vectors", spec, n)
    return index, spec


