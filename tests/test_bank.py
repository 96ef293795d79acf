"""SupportBank mechanics: replace, remove, persistence, torn and mismatched banks, approximate index."""
import json
import os

import numpy as np
import pytest

from fewshot.bank import SupportBank
from fewshot.bank_shards import SliceBatch


def _batch(rng, n=6, dim=16, size=8, labels=(1, 2), payload=True):
    masks = np.zeros((n, size, size), np.uint16)
    for i in range(n - 1):  # the last slice is a negative (no label)
        masks[i, : size // 2, : size // 2] = labels[i % len(labels)]
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pay = {"feat": rng.normal(size=(n, len(labels), 3)).astype(np.float16)} if payload else {}
    return SliceBatch(
        images=rng.random((n, size, size)).astype(np.float32), masks=masks, embeddings=emb,
        slice_index=np.arange(n), augmentation=[""] * n, payload=pay, payload_labels=tuple(labels),
    )


def test_put_replaces_never_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    bank = SupportBank(tmp_path / "bank", "fp")
    bank.put("a", _batch(rng))
    bank.put("b", _batch(rng))
    assert bank.stats()["slices"] == 12
    bank.put("a", _batch(rng, n=4))  # re-saving a label replaces its slices
    stats = bank.stats()
    assert stats["images"] == 2 and stats["slices"] == 10
    assert len(list((tmp_path / "bank" / "shards").iterdir())) == 2  # the old shard is gone
    assert bank.remove("a") and not bank.remove("a")
    assert bank.image_ids() == ["b"] and bank.stats()["slices"] == 6


def test_negative_slices_are_counted(tmp_path):
    bank = SupportBank(tmp_path, "fp")
    bank.put("a", _batch(np.random.default_rng(0)))
    stats = bank.stats()
    assert stats["negative_slices"] == 1
    assert stats["per_label"] == {"1": 3, "2": 2}


def test_reload_gives_identical_search(tmp_path):
    rng = np.random.default_rng(1)
    bank = SupportBank(tmp_path, "fp")
    for name in "abc":
        bank.put(name, _batch(rng))
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    scores, rows = bank.search(queries, 4)
    again, report = SupportBank.open(tmp_path, "fp")
    assert sorted(report.loaded) == ["a", "b", "c"] and not report.dropped
    scores2, rows2 = again.search(queries, 4)
    assert rows == rows2
    np.testing.assert_allclose(scores, scores2)
    s1, s2 = bank.support(rows[0][0], labels=[2, 1]), again.support(rows2[0][0], labels=[2, 1])
    np.testing.assert_array_equal(s1.mask, s2.mask)
    np.testing.assert_array_equal(s1.payload["feat"], s2.payload["feat"])
    assert s1.payload["feat"].shape == (2, 3)  # picked and ordered by the requested labels


def test_truncated_shard_is_detected_and_dropped(tmp_path):
    rng = np.random.default_rng(2)
    bank = SupportBank(tmp_path, "fp")
    bank.put("a", _batch(rng))
    bank.put("b", _batch(rng))
    shard = tmp_path / "shards" / bank.record("a")["shard"]
    target = shard / "payload.feat.npy"
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    again, report = SupportBank.open(tmp_path, "fp")
    assert "a" in report.dropped and "truncated" in report.dropped["a"]
    assert again.image_ids() == ["b"]
    # The manifest no longer references the torn shard, so the next load is clean.
    third, report3 = SupportBank.open(tmp_path, "fp")
    assert not report3.dropped and third.image_ids() == ["b"]


def test_flipped_bytes_are_detected(tmp_path):
    bank = SupportBank(tmp_path, "fp")
    bank.put("a", _batch(np.random.default_rng(3)))
    target = tmp_path / "shards" / bank.record("a")["shard"] / "masks.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    _, report = SupportBank.open(tmp_path, "fp")
    assert "checksum" in report.dropped["a"]


def test_fingerprint_or_version_mismatch_discards_everything(tmp_path):
    bank = SupportBank(tmp_path, "model-A")
    bank.put("a", _batch(np.random.default_rng(4)))
    other, report = SupportBank.open(tmp_path, "model-B")
    assert "model-A" in report.discarded_all and other.image_ids() == []
    assert not any((tmp_path / "shards").iterdir())

    bank = SupportBank(tmp_path, "fp")
    bank.put("a", _batch(np.random.default_rng(4)))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["version"] = 999
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _, report = SupportBank.open(tmp_path, "fp")
    assert "version" in report.discarded_all


def test_corrupt_manifest_is_reported(tmp_path):
    bank = SupportBank(tmp_path, "fp")
    bank.put("a", _batch(np.random.default_rng(5)))
    (tmp_path / "manifest.json").write_text('{"version": 1, "fingerp')
    again, report = SupportBank.open(tmp_path, "fp")
    assert "unreadable" in report.discarded_all and again.image_ids() == []


def test_interrupted_write_leaves_old_state_and_cleans_orphans(tmp_path):
    rng = np.random.default_rng(6)
    bank = SupportBank(tmp_path, "fp")
    bank.put("a", _batch(rng))
    before = bank.search(np.ones((1, 16), np.float32), 3)
    # A crash after the shard was written but before the manifest was replaced.
    orphan = tmp_path / "shards" / ".tmp-deadbeef"
    orphan.mkdir()
    (orphan / "images.npy").write_bytes(b"partial")
    again, report = SupportBank.open(tmp_path, "fp")
    assert report.loaded == ["a"] and not orphan.exists()
    assert again.search(np.ones((1, 16), np.float32), 3)[1] == before[1]


def test_ids_cannot_escape_the_bank(tmp_path):
    bank = SupportBank(tmp_path / "bank", "fp")
    bank.put("../../etc/passwd", _batch(np.random.default_rng(7)))
    shards = list((tmp_path / "bank" / "shards").iterdir())
    assert len(shards) == 1 and shards[0].parent == tmp_path / "bank" / "shards"
    assert not (tmp_path / "etc").exists()


def test_approximate_index_above_threshold_has_high_recall(tmp_path):
    rng = np.random.default_rng(8)
    exact = SupportBank(None, "fp", approximate_above=10**9)
    approx = SupportBank(None, "fp", approximate_above=100)
    for i in range(20):
        b = _batch(rng, n=50, dim=32, payload=False)
        exact.put(f"img{i}", b)
        approx.put(f"img{i}", b)
    q = rng.normal(size=(50, 32)).astype(np.float32)
    _, rows_exact = exact.search(q, 16)
    _, rows_approx = approx.search(q, 16)
    assert exact.index_kind == "Flat" and approx.index_kind.startswith("HNSW")
    recall = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(rows_exact, rows_approx)])
    assert recall >= 0.95


def test_pca_whitening_transform_for_descriptors():
    rng = np.random.default_rng(9)
    bank = SupportBank(None, "fp", index_transform="PCAW8,L2norm")
    bank.put("small", _batch(rng, n=4, dim=32, payload=False))
    bank.search(rng.normal(size=(1, 32)).astype(np.float32), 2)
    assert bank.index_kind == "L2norm,Flat"  # too few vectors to fit a PCA yet
    bank.put("more", _batch(rng, n=40, dim=32, payload=False))
    scores, rows = bank.search(rng.normal(size=(3, 32)).astype(np.float32), 5)
    assert bank.index_kind == "PCAW8,L2norm,Flat" and scores.shape == (3, 5)
    assert np.all(scores <= 1.0001)  # whitened then L2-normalised: inner products are cosines


def test_payload_coverage(tmp_path):
    bank = SupportBank(None, "fp")
    bank.put("a", _batch(np.random.default_rng(10), labels=(1, 2)))
    assert bank.payload_covers("a", [1, 2]) and not bank.payload_covers("a", [1, 3])


def test_two_banks_on_one_directory_keep_each_others_commits(tmp_path):
    """The CLI and the app (or its batch-infer subprocess) share a bank directory."""
    rng = np.random.default_rng(11)
    first, _ = SupportBank.open(tmp_path, "fp")
    second, _ = SupportBank.open(tmp_path, "fp")
    first.put("a", _batch(rng))
    second.put("b", _batch(rng))  # must not write a manifest without "a"
    first.put("c", _batch(rng))  # ... nor this one without "b"
    reopened, report = SupportBank.open(tmp_path, "fp")
    assert reopened.image_ids() == ["a", "b", "c"] and not report.dropped
    # Readers see the other's commits without reopening, in search results too.
    assert second.image_ids() == ["a", "b", "c"]
    vectors = np.asarray(reopened.embeddings()[[0, 6, 12]])
    _, rows = second.search(vectors, 1)
    assert [r[0][0] for r in rows] == ["a", "b", "c"]
    # Removing what another process added works, and every shard on disk is referenced.
    assert second.remove("a")
    assert first.image_ids() == ["b", "c"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {r["shard"] for r in manifest["images"].values()} == {p.name for p in (tmp_path / "shards").iterdir()}


_WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_bank import _batch
from fewshot.bank import SupportBank
rng = np.random.default_rng({seed})
for i in range(12):
    bank, report = SupportBank.open({directory!r}, "fp")  # a fresh load each time: loads race with commits
    assert not report.dropped, report.dropped
    bank.put("{tag}-%d" % i, _batch(rng, n=3))
"""


def test_two_processes_writing_one_bank_lose_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER.format(tests=tests, seed=seed, directory=str(tmp_path), tag=tag)],
                         stderr=subprocess.PIPE, text=True)
        for seed, tag in ((1, "x"), (2, "y"))
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    bank, report = SupportBank.open(tmp_path, "fp")
    assert not report.dropped
    assert bank.image_ids() == sorted(f"{t}-{i}" for t in "xy" for i in range(12))
    assert len(list((tmp_path / "shards").iterdir())) == 24


def test_read_only_open_reports_but_never_touches(tmp_path):
    bank = SupportBank(tmp_path, "model-A")
    bank.put("a", _batch(np.random.default_rng(12)))
    manifest = (tmp_path / "manifest.json").read_bytes()
    shards = sorted(p.name for p in (tmp_path / "shards").iterdir())
    other, report = SupportBank.open(tmp_path, "model-B", read_only=True)
    assert "model-A" in report.discarded_all and other.image_ids() == []
    assert (tmp_path / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == shards
    same, report = SupportBank.open(tmp_path, "model-A", read_only=True)
    assert report.loaded == ["a"] and same.stats()["slices"] == 6
    with pytest.raises(Exception, match="read-only"):
        same.put("b", _batch(np.random.default_rng(13)))
    assert not SupportBank.open(tmp_path / "absent", "fp", read_only=True)[1].loaded
    assert not (tmp_path / "absent").exists()


def test_entry_labels_are_stored_not_recomputed(tmp_path, monkeypatch):
    bank = SupportBank(tmp_path, "fp")
    bank.put("a", _batch(np.random.default_rng(14)))
    again, _ = SupportBank.open(tmp_path, "fp")

    def no_unique(*args, **kwargs):
        raise AssertionError("np.unique over masks at query time")

    monkeypatch.setattr(np, "unique", no_unique)
    stats = again.stats()
    assert stats["negative_slices"] == 1 and stats["per_label"] == {"1": 3, "2": 2}
    assert again.support(("a", 1)).labels == (2,) and again.support(("a", 5)).labels == ()


def test_small_banks_are_whitened_in_fewer_dimensions():
    """Few-shot banks hold tens of entries: PCA keeps n // 2 dimensions instead of switching off."""
    rng = np.random.default_rng(15)
    bank = SupportBank(None, "fp", index_transform="PCAW32,L2norm")
    bank.put("a", _batch(rng, n=20, dim=64, payload=False))
    assert bank.stats()["index"] == "PCAW10,L2norm,Flat"  # reported before any search builds it
    scores, _ = bank.search(rng.normal(size=(2, 64)).astype(np.float32), 3)
    assert bank.index_kind == "PCAW10,L2norm,Flat" and np.all(scores <= 1.0001)
    tiny = SupportBank(None, "fp", index_transform="PCAW32,L2norm")
    tiny.put("a", _batch(rng, n=6, dim=64, payload=False))
    assert tiny.stats()["index"] == "L2norm,Flat"  # 3 dimensions would say nothing


def test_additions_grow_the_index_in_place(tmp_path):
    rng = np.random.default_rng(16)
    bank = SupportBank(tmp_path, "fp", approximate_above=50)
    for i in range(12):
        bank.put(f"img{i}", _batch(rng, n=6, dim=32, payload=False))
    bank.search(rng.normal(size=(1, 32)).astype(np.float32), 4)
    index = bank._index
    assert bank.index_kind.startswith("HNSW") and index.ntotal == 72
    new = _batch(rng, n=6, dim=32, payload=False)
    bank.put("new", new)
    assert bank._index is index and index.ntotal == 78  # added, not rebuilt
    _, rows = bank.search(new.embeddings, 1)
    assert [r[0] for r in rows] == [("new", i) for i in range(6)]
    bank.put("new", _batch(rng, n=6, dim=32, payload=False))  # a replacement: HNSW cannot delete
    assert bank._index is None
    _, rows = bank.search(new.embeddings, 1)
    assert bank._index is not index and bank._index.ntotal == 78
    # An exact bank grown in place searches like one rebuilt from disk.
    flat = SupportBank(tmp_path / "flat", "fp")
    flat.put("a", _batch(rng, dim=32))
    flat.search(rng.normal(size=(1, 32)).astype(np.float32), 2)
    flat.put("b", _batch(rng, dim=32))
    queries = rng.normal(size=(6, 32)).astype(np.float32)
    reloaded, _ = SupportBank.open(tmp_path / "flat", "fp")
    assert flat.search(queries, 5)[1] == reloaded.search(queries, 5)[1]


def test_a_bank_of_many_scans_keeps_few_files_open(tmp_path, monkeypatch):
    """Each mapped shard file holds a file descriptor; mapped all at once, a bank of a few thousand
    scans ran out of them ("Too many open files"). Files are mapped when read and only the most
    recently used stay open, so reading every entry of a bank never holds more than the cap, and
    what is read is what was written (also after its mapping was dropped and made again)."""
    import fewshot.bank_shards as shards

    monkeypatch.setattr(shards, "_MAPPINGS", shards._OpenMappings(8))

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_files()
    rng = np.random.default_rng(4)
    bank = SupportBank(tmp_path, "fp")
    written = {}
    for i in range(30):
        batch = _batch(rng, n=3)
        written[f"scan{i}"] = batch
        bank.put(f"scan{i}", batch)
    reopened, report = SupportBank.open(tmp_path, "fp")
    assert len(report.loaded) == 30
    for sweep in range(2):  # the second sweep maps again what the first dropped
        for name, batch in written.items():
            for i in range(3):
                support = reopened.support((name, i), labels=[1, 2])
                np.testing.assert_array_equal(support.mask, batch.masks[i])
                np.testing.assert_array_equal(support.payload["feat"], batch.payload["feat"][i])
        # two banks' lock files and the cap; the 30 scans' 150 files of both banks were all mapped before it
        assert open_files() - before <= 8 + 4
        assert len(shards._MAPPINGS) <= 8
