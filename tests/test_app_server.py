"""The MONAI Label app, end to end: a real server on loopback driven by MONAI Label's own client.

One server (preset random-tiny, tiny random networks) serves the whole module on a datastore of
four CHAOS T2 volumes copied from ../shared/data (two with final labels). The tests run in file
order and share its state: the bank grows as labels are saved. The last test kills the server
with SIGKILL in the middle of an ingestion and checks the next start-up repairs the bank while
reloading, not rebuilding, everything else.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
APP = PROJECT / "apps" / "fewshot"
SHARED_DATA = Path(os.environ.get("FEWSHOT_SHARED_DATA", PROJECT.parent / "shared" / "data"))
CHAOS = SHARED_DATA / "chaos-t2"
LABELLED = ["1", "2"]
UNLABELLED = ["3", "5"]
# gallbladder has no example anywhere: inference must skip it with a message, not fail.
LABELS = "liver=1,right_kidney=2,left_kidney=3,spleen=4,gallbladder=5"
ALLOWED = {0, 1, 2, 3, 4, 5}
STARTUP_TIMEOUT = 240
INGEST_TIMEOUT = 180



def server_test(fn):
    """A test that drives the real server on the real data."""
    return pytest.mark.server(pytest.mark.shared_data(pytest.mark.slow(fn)))


# ---------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_id(case: str) -> str:
    return f"image_{case}"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (datastore, its index, the bank, cached embeddings) -> sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != ".lock":  # lock files are touched by readers too
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Server:
    """``python -m monailabel.main start_server`` in its own process group, logging to a file."""

    def __init__(self, studies: Path, models_dir: Path, log: Path, preset: str = "random-tiny", extra=()):
        self.studies, self.models_dir, self.log_path = studies, models_dir, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = [("preset", preset), ("models_dir", str(models_dir)), ("labels", LABELS), *extra]
        self.cmd = [
            sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]
        for key, value in conf:
            self.cmd += ["-c", key, value]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=PROJECT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self):
        from monailabel.client import MONAILabelClient

        tmp = self.log_path.parent / "client"
        tmp.mkdir(exist_ok=True)
        return MONAILabelClient(self.url, tmpdir=str(tmp))

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                return self.client().info()
            except Exception:
                time.sleep(0.5)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def bank(self) -> dict:
        return self.client().info()["models"]["fewshot_sam2"]["support_bank"]

    def wait_bank_idle(self, timeout: float = INGEST_TIMEOUT) -> dict:
        """Until nothing is queued, resyncing, ingesting or warming the strategy's cache."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            bank = self.bank()
            work = bank["ingestion"]
            if work["state"] == "idle" and not work["pending"] and not work["resync_pending"]:
                return bank
            time.sleep(0.25)
        pytest.fail(f"bank still busy after {timeout} s: {self.bank()['ingestion']}\n{self.log()[-3000:]}")

    def wait_for_log(self, pattern: str, timeout: float = INGEST_TIMEOUT, start: int = 0) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            match = re.search(pattern, self.log()[start:])
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"no log line matching {pattern!r}:\n{self.log()[-3000:]}")

    def request(self, method: str, selector: str, files: dict | None = None) -> tuple[int, str]:
        """The same REST calls as MONAILabelClient (and Slicer), returning the status instead of raising."""
        from monailabel.client.client import MONAILabelUtils

        if files is None:
            status, body, _, _ = MONAILabelUtils.http_method(method, self.url, selector)
        else:
            status, body, _, _ = MONAILabelUtils.http_multipart(method, self.url, selector, {"params": "{}"}, files)
        return status, body.decode(errors="replace") if isinstance(body, bytes) else str(body)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


def save_label(server: Server, case_id: str, label: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    response = server.client().save_label(case_id, str(label))
    return response, time.perf_counter() - start


def quote(text: str) -> str:
    from urllib.parse import quote_plus

    return quote_plus(text)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def app_tmp(tmp_path_factory) -> Path:
    if not CHAOS.is_dir() or not any(CHAOS.glob("image_*")):
        pytest.skip(f"real data {CHAOS} is absent (it lives in ../shared/data beside the project)")
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def datastore(app_tmp) -> Path:
    root = app_tmp / "datastore"
    (root / "labels" / "final").mkdir(parents=True)
    for case in LABELLED + UNLABELLED:
        shutil.copyfile(CHAOS / f"image_{case}.nii.gz", root / f"image_{case}.nii.gz")
    for case in LABELLED:
        shutil.copyfile(CHAOS / f"label_{case}.nii.gz", root / "labels" / "final" / f"image_{case}.nii.gz")
    return root


@pytest.fixture(scope="module")
def foundation_start(app_tmp, models_dir):
    """Started first so that its (slow) imports overlap the main server's start-up."""
    studies = app_tmp / "foundation-datastore"
    studies.mkdir()
    empty_models = app_tmp / "no-weights"
    empty_models.mkdir()
    server = Server(studies, empty_models, app_tmp / "foundation.log", preset="foundation").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(foundation_start, datastore, models_dir, app_tmp):
    # Fewer bank entries per image (no augmented copies) keep ingestion quick; it also exercises
    # a dotted engine option passed through -c.
    srv = Server(datastore, models_dir, app_tmp / "server.log", extra=[("bank.augmentations_per_slice", "0")]).start()
    srv.wait_ready()
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------------------------
# tests, in the order a user's session would run


@server_test
def test_info_lists_task_strategy_bank_and_config(server):
    info = server.client().info()
    assert "config" not in info  # Slicer refuses a top-level config
    model = info["models"]["fewshot_sam2"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4, "gallbladder": 5}
    assert set(model["config"]) >= {"top_k", "matching", "memories", "device"}
    assert "random-tiny" in model["description"] and "RANDOM weights" in model["description"]
    assert {"bank_coverage", "random", "first"} <= set(info["strategies"])
    bank = server.wait_bank_idle()
    assert bank["images"] == len(LABELLED) and bank["slices"] > 0
    assert set(bank["per_label"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert bank["augmented_slices"] == 0  # -c bank.augmentations_per_slice 0 reached the engine
    log = server.log()
    assert "few-shot preset 'random-tiny'" in log and "weights: sam2-random-tiny" in log


@server_test
def test_foundation_without_weights_fails_with_one_clear_message(foundation_start):
    rc = foundation_start.proc.wait(STARTUP_TIMEOUT)
    log = foundation_start.log()
    assert rc != 0
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("ERROR: few-shot app cannot start")]
    assert len(errors) == 1, log[-3000:]
    assert "python -m fewshot models download" in errors[0] and "not found" in errors[0]


@server_test
def test_infer_unlabelled_image_returns_label_with_its_geometry(server, datastore):
    server.wait_bank_idle()
    case = image_id(UNLABELLED[0])
    params = {"matching": False, "top_k": 8, "memories": 2}
    label_file, result = server.client().infer("fewshot_sam2", case, params)
    out, image = nib.load(label_file), nib.load(datastore / f"{case}.nii.gz")
    assert out.shape == image.shape
    assert np.allclose(out.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= ALLOWED
    assert result["options"] == {"top_k": 8, "matching": False, "memories": 2}
    assert set(result["segmented"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert "gallbladder" in result["skipped"] and "gallbladder: skipped" in result["message"]
    assert result["latencies"]["total"] > 0
    used = {s["image_id"] for per_label in result["provenance"].values() for z in per_label["slices"].values() for s in z["supports"]}
    assert used and used <= {image_id(c) for c in LABELLED}


@server_test
def test_bad_inputs_get_4xx_and_change_nothing_on_disk(server, datastore, app_tmp):
    server.wait_bank_idle()
    before, bank_before = tree_digest(datastore), server.bank()
    image = nib.load(datastore / "image_1.nii.gz")
    bad = app_tmp / "bad"
    bad.mkdir()
    (bad / "garbage.nii.gz").write_bytes(b"garbage")  # 7 bytes
    (bad / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), image.affine), bad / "wrong_shape.nii.gz")
    shifted = image.affine.copy()
    shifted[:3, 3] += 40.0
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), shifted), bad / "wrong_affine.nii.gz")
    values = np.asarray(nib.load(CHAOS / "label_1.nii.gz").dataobj).astype(np.uint8)
    values[values == 4] = 9
    nib.save(nib.Nifti1Image(values, image.affine, image.header), bad / "unknown_value.nii.gz")
    good_label = str(CHAOS / "label_3.nii.gz")

    cases = [
        # (method, selector, files, expected status, words in the message)
        ("PUT", "/datastore/label?image=no_such_image", {"label": good_label}, 404, "unknown image id"),
        ("PUT", f"/datastore/label?image={quote('../../etc/passwd')}", {"label": good_label}, 400, "invalid image id"),
        ("PUT", f"/datastore/label?image=image_3&tag={quote('../../outside')}", {"label": good_label}, 400, "invalid label tag"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "wrong_shape.nii.gz")}, 422, "does not match image shape"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "wrong_affine.nii.gz")}, 422, "affine"),
        # the stock server answers 200 to this one and overwrites image_1's final label
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "garbage.nii.gz")}, 422, "not a valid NIfTI"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "notes.txt")}, 415, "file type"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "unknown_value.nii.gz")}, 422, "[9] are not among the configured labels"),
        ("PUT", f"/datastore/image?image={quote('../escape')}", {"file": str(CHAOS / 'image_8.nii.gz')}, 400, "invalid image id"),
        ("PUT", "/datastore/image?image=junk", {"file": str(bad / "garbage.nii.gz")}, 422, "not a valid NIfTI"),
        # replacing a labelled image with a volume its final label does not fit
        ("PUT", "/datastore/image?image=image_1", {"file": str(CHAOS / 'image_8.nii.gz')}, 409, "does not fit the image's existing final label"),
        ("POST", f"/infer/fewshot_sam2?image={quote('../../etc/passwd')}", None, 400, "invalid image id"),
        ("POST", f"/infer/fewshot_sam2?image={quote(str(CHAOS / 'image_8.nii.gz'))}", None, 400, "invalid image id"),
        ("POST", "/infer/fewshot_sam2?image=no_such_image", None, 404, "unknown image id"),
        ("DELETE", f"/datastore/label?id={quote('../labels/final/image_1')}&tag=final", None, 400, "invalid image id"),
        ("DELETE", "/datastore/label?id=image_3&tag=final", None, 404, "has no 'final' label"),
        ("DELETE", f"/datastore/image?id={quote('../../x')}", None, 400, "invalid image id"),
    ]
    failures = []
    for method, selector, files, expected, words in cases:
        status, body = server.request(method, selector, files)
        if status != expected or words not in body:
            failures.append(f"{method} {selector}: {status} {body[:200]} (expected {expected} with {words!r})")
    assert not failures, "\n".join(failures)
    time.sleep(1.0)  # let a wrongly queued ingestion or file event show up, if there were one
    server.wait_bank_idle()
    assert tree_digest(datastore) == before
    after = server.bank()
    assert (after["images"], after["slices"]) == (bank_before["images"], bank_before["slices"])
    assert not list((datastore.parent).glob("escape*")) and not (datastore / "labels" / "outside").exists()


@server_test
def test_strategy_proposes_unlabelled_images_only(server):
    client = server.client()
    unlabelled = {image_id(c) for c in UNLABELLED}
    for strategy in ("bank_coverage", "bank_coverage", "random", "first"):
        proposal = client.next_sample(strategy, {})
        assert proposal["id"] in unlabelled, (strategy, proposal)
    proposal = client.next_sample("bank_coverage", {})
    assert proposal["reason"] == "farthest from the support bank" and proposal["score"] > 0


@server_test
def test_saving_a_label_grows_the_bank_once(server, datastore):
    before = server.wait_bank_idle()
    case = image_id(UNLABELLED[0])
    label = CHAOS / f"label_{UNLABELLED[0]}.nii.gz"
    response, put_seconds = save_label(server, case, label)
    queued = response["support_bank"]["ingestion"]
    assert response["label"] == case and (case in queued["pending"] or queued["current"] == case)
    grown = server.wait_bank_idle()
    assert grown["images"] == before["images"] + 1 and grown["slices"] > before["slices"]
    ingest_seconds = grown["ingestion"]["last"]["seconds"]
    # The response does not wait for the encoders.
    assert put_seconds < ingest_seconds, (put_seconds, ingest_seconds)
    print(f"\nPUT /datastore/label answered in {put_seconds:.3f} s; background ingestion took {ingest_seconds:.3f} s")
    assert sha256(datastore / "labels" / "final" / f"{case}.nii.gz") == sha256(label)
    # The next inference uses the new examples: the image's own slices are now its nearest supports.
    _, result = server.client().infer("fewshot_sam2", case, {"matching": False, "top_k": 4, "memories": 1})
    used = {s["image_id"] for per_label in result["provenance"].values() for z in per_label["slices"].values() for s in z["supports"]}
    assert case in used

    done = grown["ingestion"]["completed"]
    save_label(server, case, label)  # re-saving replaces the image's entries, never adds to them
    again = server.wait_bank_idle()
    assert again["ingestion"]["completed"] > done
    assert (again["images"], again["slices"], again["per_label"]) == (grown["images"], grown["slices"], grown["per_label"])


@server_test
def test_two_concurrent_saves_both_land(server, datastore):
    before = server.wait_bank_idle()
    jobs = {image_id(UNLABELLED[1]): CHAOS / f"label_{UNLABELLED[1]}.nii.gz",
            image_id(LABELLED[0]): CHAOS / f"label_{LABELLED[0]}.nii.gz"}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def put(case, label):
        try:
            barrier.wait()
            results[case] = save_label(server, case, label)[0]
        except Exception as exc:  # reported below
            errors.append(f"{case}: {exc}")

    threads = [threading.Thread(target=put, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and set(results) == set(jobs)
    bank = server.wait_bank_idle()
    assert set(bank["image_ids"]) >= set(jobs)
    assert bank["images"] == before["images"] + 1  # image_1 was already there: replaced, not added
    for case, label in jobs.items():
        assert sha256(datastore / "labels" / "final" / f"{case}.nii.gz") == sha256(label)
    assert not bank["ingestion"]["failed"]
    # Everything is labelled now: nothing left to propose.
    assert server.client().next_sample("bank_coverage", {}) == {}


@server_test
def test_deleting_a_label_removes_its_entries(server, datastore):
    before = server.wait_bank_idle()
    case = image_id(UNLABELLED[1])
    status, body = server.request("DELETE", f"/datastore/label?id={case}&tag=final")
    assert status == 200, body
    bank = server.wait_bank_idle()
    assert case not in bank["image_ids"] and bank["images"] == before["images"] - 1
    assert not (datastore / "labels" / "final" / f"{case}.nii.gz").exists()
    assert server.client().next_sample("bank_coverage", {})["id"] == case


@server_test
def test_uploaded_image_joins_then_leaves_with_its_label(server, datastore):
    before = server.wait_bank_idle()
    client = server.client()
    assert client.upload_image(str(CHAOS / "image_8.nii.gz"), "uploaded_8")["image"] == "uploaded_8"
    save_label(server, "uploaded_8", CHAOS / "label_8.nii.gz")
    grown = server.wait_bank_idle()
    assert "uploaded_8" in grown["image_ids"] and grown["images"] == before["images"] + 1
    status, body = server.request("DELETE", "/datastore/image?id=uploaded_8")
    assert status == 200, body
    bank = server.wait_bank_idle()
    assert "uploaded_8" not in bank["image_ids"] and bank["images"] == before["images"]
    assert not list(datastore.rglob("uploaded_8*"))


@server_test
def test_kill9_during_ingestion_then_restart_reloads_and_repairs(server, datastore, models_dir, app_tmp):
    server.wait_bank_idle()
    bank_dir = datastore / ".fewshot" / "bank-random-tiny"
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    kept = {i: r["shard"] for i, r in manifest["images"].items()}
    kept_mtimes = {i: (bank_dir / "shards" / s).stat().st_mtime_ns for i, s in kept.items()}

    case = image_id(UNLABELLED[1])
    mark = len(server.log())
    save_label(server, case, CHAOS / f"label_{UNLABELLED[1]}.nii.gz")
    server.wait_for_log(rf"bank: ingesting '{case}'", start=mark)
    server.kill9()
    assert (datastore / "labels" / "final" / f"{case}.nii.gz").exists()  # the label itself was saved
    assert case not in json.loads((bank_dir / "manifest.json").read_text())["images"]  # killed before the commit

    restarted = Server(datastore, models_dir, app_tmp / "restart.log", extra=[("bank.augmentations_per_slice", "0")]).start()
    try:
        restarted.wait_ready()
        bank = restarted.wait_bank_idle()
        log = restarted.log()
        reloaded = re.search(r"support bank reloaded from .*: (\d+) images", log)
        assert reloaded and int(reloaded.group(1)) >= len(kept), log[-3000:]
        assert re.search(r"bank: resync \d+/\d+", log) and f"bank: ingesting '{case}'" in log, log[-3000:]
        # Reloaded, not rebuilt: the other images' shards are the very same files.
        manifest = json.loads((bank_dir / "manifest.json").read_text())
        for image, shard in kept.items():
            if image != case:
                assert manifest["images"][image]["shard"] == shard
                assert (bank_dir / "shards" / shard).stat().st_mtime_ns == kept_mtimes[image]
        # Repaired: the killed ingestion is redone from the label on disk.
        assert case in bank["image_ids"]
        label_sha = sha256(datastore / "labels" / "final" / f"{case}.nii.gz")
        assert manifest["images"][case]["source"]["label_sha256"] == label_sha
        assert bank["images"] == len(list((datastore / "labels" / "final").glob("*.nii.gz")))
        assert not [p for p in (bank_dir / "shards").iterdir() if p.name.startswith(".tmp")]
    finally:
        restarted.stop()


# ---------------------------------------------------------------------------------------------
# the demo datastore shipped with the project


def _generator():
    spec = importlib.util.spec_from_file_location("make_sample_datastore", PROJECT / "scripts" / "make_sample_datastore.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_sample_datastore_is_deterministic_and_loadable(tmp_path):
    from fewshot.volume import read_label, read_volume

    gen = _generator()
    first = gen.write_datastore(tmp_path / "a", cases=6, labelled=3, seed=0)
    second = gen.write_datastore(tmp_path / "b", cases=6, labelled=3, seed=0)
    assert first == second
    committed = PROJECT / "sample-datastore"
    assert {rel: sha256(committed / rel) for rel in first} == first, "sample-datastore/ differs from its generator"
    assert sum((committed / rel).stat().st_size for rel in first) < 2 * 1024 * 1024
    images = sorted(committed.glob("*.nii.gz"))
    labels = sorted((committed / "labels" / "final").glob("*.nii.gz"))
    assert 0 < len(labels) < len(images)
    for path in images:
        volume = read_volume(path)
        assert volume.array.ndim == 3
    for path in labels:
        label = read_label(path, read_volume(committed / path.name), allowed=list(gen.LABELS.values()))
        assert len(set(np.unique(label).tolist()) - {0}) >= 2


# ---------------------------------------------------------------------------------------------
# the app's own pieces, without a server (fake engine host)


@pytest.fixture
def app_lib():
    """The app's ``lib`` package, imported as MONAI Label imports it (app folder first on sys.path)."""
    sys.path.insert(0, str(APP))
    try:
        import lib.activelearning.bank_coverage
        import lib.embedding_cache
        import lib.ingest

        yield lib
    finally:
        sys.path.remove(str(APP))
        for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[name]


class FakeDatastore:
    def __init__(self, unlabelled: dict[str, str]):
        self.unlabelled = unlabelled

    def get_unlabeled_images(self, *args):
        return list(self.unlabelled)

    def get_image_uri(self, image_id):
        return self.unlabelled.get(image_id, "")


class FakeHost:
    """A host around a real in-memory SupportBank holding the given unit vectors (None: empty bank)."""

    def __init__(self, vectors: np.ndarray | None):
        from fewshot.bank import SliceBatch, SupportBank

        self.engine = type("E", (), {"bank": SupportBank(None, "fp")})()
        if vectors is not None:
            n = len(vectors)
            self.engine.bank.put("labelled", SliceBatch(
                images=np.zeros((n, 4, 4), np.float32), masks=np.ones((n, 4, 4), np.uint16),
                embeddings=vectors, slice_index=np.arange(n), augmentation=[""] * n,
            ))


def _unit_rows(*rows) -> np.ndarray:
    a = np.asarray(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_bank_coverage_farthest_typical_and_cached(app_lib, tmp_path):
    files = {}
    vectors = {
        "typical_a": _unit_rows([1, 0.1, 0], [1, 0.2, 0]),
        "typical_b": _unit_rows([1, 0, 0.1], [1, 0.1, 0.1]),
        "outlier": _unit_rows([0, 0, 1], [0, 0.1, 1]),
    }
    for name in vectors:
        files[name] = str(tmp_path / f"{name}.nii.gz")
        Path(files[name]).write_bytes(name.encode())  # distinct content: distinct cache keys
    calls = []

    def compute(path):
        calls.append(path)
        return vectors[Path(path).name.removesuffix(".nii.gz")]

    cache = app_lib.embedding_cache.EmbeddingCache(tmp_path / "cache", "embedder-key", compute)
    BankCoverage = app_lib.activelearning.bank_coverage.BankCoverage
    datastore = FakeDatastore(files)

    empty = BankCoverage(FakeHost(None), cache)(None, datastore)
    assert empty["id"] in ("typical_a", "typical_b") and "most typical" in empty["reason"]
    covered = BankCoverage(FakeHost(_unit_rows([1, 0.1, 0.05])), cache)(None, datastore)
    assert covered["id"] == "outlier" and covered["reason"] == "farthest from the support bank"
    assert sorted(calls) == sorted(files.values())  # each file embedded once, then read from disk
    assert len(list((tmp_path / "cache" / "embedder-key").glob("*.npy"))) == 3
    assert BankCoverage(FakeHost(None), cache)(None, FakeDatastore({})) is None


class SlowHost:
    """Records ingestions; fails the test if two ever overlap."""

    def __init__(self):
        self.calls, self.active, self.overlap = [], 0, False
        self.engine = type("E", (), {"bank": type("B", (), {"label_values": [1]})()})()
        self._lock = threading.Lock()

    def ingest(self, image_id, image_path, label_path, source):
        with self._lock:
            self.active += 1
            self.overlap |= self.active > 1
        self.calls.append((image_id, Path(label_path).read_text()))
        time.sleep(0.2)
        with self._lock:
            self.active -= 1
        return type("R", (), {"slices": 1, "labels": [1]})()

    def remove(self, image_id):
        self.calls.append((image_id, "removed"))
        return True

    def stale_images(self, sources):
        return {}

    def bank_ids(self):
        return []

    def refresh_stats(self):
        return {}


def test_ingestion_worker_serialises_and_latest_save_wins(app_lib, tmp_path):
    labels = {}

    def write(image_id, text):
        labels[image_id] = str(tmp_path / f"{image_id}.nii.gz")
        Path(labels[image_id]).write_text(text)

    host = SlowHost()
    worker = app_lib.ingest.IngestionWorker(host, sources=lambda: {k: ("img", v) for k, v in labels.items()})
    worker.start()
    try:
        write("a", "a1")
        worker.ingest("a")
        time.sleep(0.05)  # "a" is being ingested
        for text in ("a2", "a3"):
            write("a", text)
            worker.ingest("a")  # queued twice while busy: one job, reading the latest file
        write("b", "b1")
        worker.ingest("b")
        worker.remove("c")
        assert worker.wait_idle(10)
    finally:
        worker.stop()
    assert not host.overlap
    assert host.calls == [("a", "a1"), ("a", "a3"), ("b", "b1"), ("c", "removed")]
    assert worker.status()["completed"] == 4 and not worker.status()["failed"]
