"""faiss at scale: latency, recall@16 against exact search and build time on synthetic clustered vectors."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from fewshot.bench.plan import RECALL_K
from fewshot.bench.runs import median

logger = logging.getLogger(__name__)


@dataclass
class RetrievalPoint:
    entries: int
    dim: int
    index: str  # faiss spec, as the bank builds it
    build_s: float
    batch_ms_per_query: float  # one search call for all queries (the engine searches a volume at once)
    single_ms_per_query: float  # one call per query (median)
    recall_at_k: float  # against exact inner-product search, mean over queries
    k: int = RECALL_K
    queries: int = 0
    recall_ci95: tuple[float, float] | None = None  # normal approximation over the per-query recalls


class ClusteredVectors:
    """Unit vectors from a mixture of low-rank Gaussians, shaped like slice embeddings of a bank.

    Each cluster stands for one scanned volume (``per_cluster`` entries): a centre plus variation
    along a few directions of its own (anatomy changing along the slices) plus small isotropic
    noise, all around a shared mean (every slice is an MR slice). Uniform noise in 768 dimensions
    has no such low-dimensional structure and would misrepresent how HNSW behaves on real data.
    """

    def __init__(self, dim: int, clusters: int, rank: int = 8, seed: int = 0,
                 spread: float = 0.6, along: float = 0.5, noise: float = 0.15):
        rng = np.random.default_rng(seed)
        self.dim, self.rank, self.noise, self.along = dim, rank, noise, along
        mean = rng.standard_normal(dim).astype(np.float32)
        mean /= np.linalg.norm(mean)
        centres = rng.standard_normal((clusters, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        self.centres = centres + mean
        basis = rng.standard_normal((clusters, rank, dim)).astype(np.float32)
        self.basis = basis / np.linalg.norm(basis, axis=2, keepdims=True)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        assign = rng.integers(0, len(self.centres), n)
        out = np.empty((n, self.dim), np.float32)
        order = np.argsort(assign, kind="stable")
        bounds = np.searchsorted(assign[order], np.arange(len(self.centres) + 1))
        for c in range(len(self.centres)):
            rows = order[bounds[c] : bounds[c + 1]]
            if len(rows) == 0:
                continue
            z = rng.standard_normal((len(rows), self.rank)).astype(np.float32) * (self.along / np.sqrt(self.rank))
            out[rows] = self.centres[c] + z @ self.basis[c]
        for start in range(0, n, 100_000):  # noise in chunks: bounded temporary memory at 1e6 x 768
            block = out[start : start + 100_000]
            block += rng.standard_normal(block.shape, dtype=np.float32) * (self.noise / np.sqrt(self.dim))
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        return out


def retrieval_scale(sizes: Sequence[int], dim: int, bank_settings: Mapping, index_transform: str,
                    n_queries: int, seed: int = 0, per_cluster: int = 100,
                    on_point: Callable[[RetrievalPoint], None] | None = None) -> list[RetrievalPoint]:
    """faiss latency and recall@16 of the bank's own index construction, per bank size."""
    import faiss

    from fewshot.bank_index import IndexSettings, build_index

    settings = IndexSettings.from_settings(bank_settings)
    points = []
    for n in sizes:
        rng = np.random.default_rng(seed)
        mixture = ClusteredVectors(dim, clusters=max(10, n // per_cluster), seed=seed)
        logger.info("retrieval: %d vectors of dimension %d", n, dim)
        data = mixture.sample(n, rng)
        queries = mixture.sample(n_queries, rng)
        t0 = time.perf_counter()
        index, spec = build_index(data, index_transform, settings.approximate_above, settings.hnsw_m,
                                  settings.hnsw_ef_search)
        build_s = time.perf_counter() - t0
        k = min(RECALL_K, n)
        index.search(queries[:1], k)  # first call allocates; not what a user waits for each time
        t0 = time.perf_counter()
        _, found = index.search(queries, k)
        batch_ms = (time.perf_counter() - t0) * 1000 / n_queries
        single = []
        for q in queries[: min(50, n_queries)]:
            t0 = time.perf_counter()
            index.search(q[None], k)
            single.append((time.perf_counter() - t0) * 1000)
        # Exact inner-product neighbours without copying the data into a second index.
        _, exact = faiss.knn(queries, data, k, metric=faiss.METRIC_INNER_PRODUCT)
        per_query = np.array([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist())])
        recall = float(per_query.mean())
        half = 1.96 * float(per_query.std(ddof=1)) / np.sqrt(len(per_query)) if len(per_query) > 1 else float("nan")
        point = RetrievalPoint(n, dim, spec, build_s, batch_ms, median(single), recall, k, len(per_query),
                               (max(0.0, recall - half), min(1.0, recall + half)))
        logger.info("retrieval %d (%s): build %.1f s, %.3f ms/query batched, %.3f ms single, recall@%d %.4f "
                    "(95%% CI %.4f-%.4f, %d queries)", n, spec, build_s, batch_ms, point.single_ms_per_query, k,
                    recall, *point.recall_ci95, len(per_query))
        points.append(point)
        if on_point:
            on_point(point)
        del index, data
    return points
