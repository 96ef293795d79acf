"""The bank at scale: resident memory and latency of engine.segment with ~1e5 entries, against the
bench's own small bank, in one process with the same networks.

The large bank is the bench's real bank (ingested by the engine at this size) copied under new
image ids until it holds the wanted number of entries: each copy gets its own ``embeddings.npy``
(the real vectors plus 1 % Gaussian noise, so the faiss index is not degenerate) and ``meta.json``;
its images, masks and cached SAM 2 memories are hard links to the real shard's files (same bytes
and per-entry sizes: 1e5 entries of 512² memories would otherwise need ~100 GB of disk). The
manifest is written in SupportBank's format and the bank is opened by SupportBank itself, checking
file sizes (``verify="size"``, as a batch worker does; sha256 would re-read every copy).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fewshot.meters import PeakRss, rss_bytes
from fewshot.bench.runs import exactly, rounded, timed_segment

logger = logging.getLogger(__name__)


def replicate_bank(template: Path, dest: Path, entries: int, seed: int = 0) -> dict:
    """A bank of about ``entries`` entries made of copies of ``template``'s shards (see the module doc)."""
    from fewshot.bank import FORMAT_VERSION
    from fewshot.files import file_sha256

    manifest = json.loads((template / "manifest.json").read_text())
    records = manifest["images"]
    per_round = sum(r["entries"] for r in records.values())
    rounds = max(1, -(-entries // per_round))
    rng = np.random.default_rng(seed)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "shards").mkdir(parents=True)
    images = {}
    for n in range(rounds):
        for image_id, record in records.items():
            new_id = f"{image_id}-copy{n:06d}"
            src, shard = template / "shards" / record["shard"], f"{new_id}-shard"
            out = dest / "shards" / shard
            out.mkdir()
            files = dict(record["files"])
            for name in record["files"]:
                if name == "embeddings.npy":
                    emb = np.load(src / name)
                    emb = emb + rng.normal(0, 0.01 * float(np.abs(emb).mean() or 1), emb.shape).astype(emb.dtype)
                    np.save(out / name, emb)
                elif name == "meta.json":
                    meta = json.loads((src / name).read_text())
                    meta["image_id"] = new_id
                    (out / name).write_text(json.dumps(meta))
                else:
                    os.link(src / name, out / name)  # same bytes: shared, as the page cache will see them
                    continue
                files[name] = {"size": (out / name).stat().st_size, "sha256": file_sha256(out / name)}
            images[new_id] = dict(record, shard=shard, files=files)
    (dest / "manifest.json").write_text(json.dumps(
        {"version": FORMAT_VERSION, "fingerprint": manifest["fingerprint"], "images": images}, indent=1, sort_keys=True))
    return {"entries": rounds * per_round, "images": len(images), "entries_per_template": per_round}


@dataclass
class ScalePoint:
    entries: int
    index: str
    open_s: float  # SupportBank opening the manifest and mapping every shard
    index_build_s: float  # the first search builds the faiss index
    per_slice_s: float  # engine.segment on the bench's query slab, cold caches
    retrieve_ms_per_slice: float
    payload_bytes_per_entry: int
    disk_gb: float  # the bank's bytes as if every copy were its own file
    rss_before_open_mb: float
    rss_after_mb: float  # after opening, building the index and segmenting
    peak_rss_mb: float

    def as_dict(self) -> dict:
        return {k: rounded(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _measure(engine, query: Path, keep: int, device: str, entries: int, open_s: float, build_s: float,
             rss_before: float, disk: float) -> ScalePoint:
    run = timed_segment(engine, query, device, cold=True, options=exactly(keep))
    n = max(1, run.slices)
    return ScalePoint(entries, engine.bank.index_spec(), open_s, build_s, run.total_s / n,
                      1000 * run.stages_s.get("retrieve", 0.0) / n, engine.bank.stats()["payload_bytes_per_entry"],
                      disk / 1e9, rss_before, rss_bytes() / 2**20, run.peak_rss_mb)


def bank_at_scale(engine, bank_dir: Path, work: Path, query: Path, keep: int, device: str,
                  sizes: tuple[int, ...]) -> list[ScalePoint]:
    """The bench's own bank, then copies of it at each of ``sizes`` entries, each opened by SupportBank
    and segmenting ``query`` with the same networks (``engine``'s)."""
    from fewshot.bank import SupportBank
    from fewshot.engine import Engine

    gc.collect()
    disk = sum(p.stat().st_size for p in bank_dir.rglob("*") if p.is_file())
    engine.bank.search(np.zeros((1, engine.bank.dim), np.float32), 1)  # its index exists already
    points = [_measure(engine, query, keep, device, engine.bank.num_entries, 0.0, 0.0, rss_bytes() / 2**20, disk)]
    for size in sizes:
        dest = work / f"{bank_dir.name}-x{size}"
        built = replicate_bank(bank_dir, dest, size)
        logger.info("bench scale: %d entries in %d images (copies of %s)", built["entries"], built["images"], bank_dir.name)
        gc.collect()
        rss_before = rss_bytes() / 2**20
        with PeakRss():
            t0 = time.perf_counter()
            src = engine.bank
            bank, report = SupportBank.open(dest, src.fingerprint, index_transform=src.index_transform,
                                            approximate_above=src.approximate_above, hnsw_m=src.hnsw_m,
                                            hnsw_ef_search=src.hnsw_ef_search, read_only=True, verify="size")
            if bank.num_entries != built["entries"]:
                raise RuntimeError(f"the copied bank opened with {bank.num_entries} of {built['entries']} entries: {report}")
            open_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            bank.search(np.zeros((1, bank.dim), np.float32), 1)
            build_s = time.perf_counter() - t0
        big = Engine(engine.settings, engine.embedder, engine.matcher, engine.transfer, bank, engine.label_names)
        disk = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        point = _measure(big, query, keep, device, bank.num_entries, open_s, build_s, rss_before, disk)
        logger.info("bench scale: %d entries, %.2f s per slice, RSS %.0f -> %.0f MB", point.entries,
                    point.per_slice_s, point.rss_before_open_mb, point.rss_after_mb)
        points.append(point)
        del big, bank
        gc.collect()
        shutil.rmtree(dest, ignore_errors=True)
    return points
