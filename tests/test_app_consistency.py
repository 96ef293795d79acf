"""The datastore and the bank agree under races, changes made on disk by other tools, and storage
failures; when they cannot, ``/info`` says so (issue 16).

One real server on loopback (preset random-tiny) serves the module, on small synthetic volumes so
the tests need no shared data. Its datastore sits on file systems the tests control: a tmpfs for the
datastore (remounted read-only or filled to the last byte), another for ``labels/final`` (so a label
can be written while the index cannot), and a third for ``.fewshot`` (the bank). Mounting needs
root with CAP_SYS_ADMIN, as on the CI machine; without it the storage tests skip. The tests run in
file order and share the server's state.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_harness import Server, ServerFailed, mount_tmpfs, remount, run_quietly, tree_digest

SHAPE = (72, 64, 20)
SHORT = (72, 64, 10)  # the same image id replaced by a scan with fewer slices
AFFINE = np.diag([1.5, 1.5, 5.0, 1.0])
RACE_ROUNDS = 20  # a 5-in-10 failure passes 20 rounds with probability 1e-6
SAVE_DELETE_CYCLES = 44  # where the stock file watcher died
NOTICE_TIMEOUT = 30.0
RETRY_SECONDS = 2.0  # -c storage_retry_seconds: the server's wait between attempts while its disk fails


# ---------------------------------------------------------------------------------------------
# volumes and file systems


def phantom(shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image with one bright ellipsoid, and its label (value 1)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    organ = ((x - cx) / 0.45) ** 2 + ((y - cy) / 0.35) ** 2 + (z / 0.8) ** 2 < 1
    image = 100 + 400 * organ + 20 * np.sin(3 * x) + rng.normal(0, 5, shape)
    return image.astype(np.float32), organ.astype(np.uint8)


def write_nifti(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fill(folder: Path) -> Path:
    """Write a file until the file system is full, to the last block; delete it to free the space."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 12, 1 << 9):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("volumes")
    image, label = phantom()
    short_image, _ = phantom(SHORT, seed=1)
    _, other_label = phantom(seed=2)
    return {
        "image": write_nifti(image, folder / "image.nii.gz"),
        "label": write_nifti(label, folder / "label.nii.gz"),
        "other_label": write_nifti(other_label, folder / "other_label.nii.gz"),
        "short_image": write_nifti(short_image, folder / "short_image.nii.gz"),
    }


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """datastore (tmpfs), datastore/labels/final (tmpfs), datastore/.fewshot (tmpfs), or plain folders."""
    root = tmp_path_factory.mktemp("consistency") / "datastore"
    finals, state = root / "labels" / "final", root / ".fewshot"
    mounted = []
    if mount_tmpfs(root, 64):
        mounted.append(root)
        for path, size in ((finals, 32), (state, 64)):
            if mount_tmpfs(path, size):
                mounted.append(path)
    finals.mkdir(parents=True, exist_ok=True)
    yield {"root": root, "finals": finals, "state": state, "mounted": len(mounted) == 3}
    for path in reversed(mounted):
        run_quietly("umount", "-l", str(path))


@pytest.fixture(scope="module")
def server(mounts, volumes, models_dir):
    root = mounts["root"]
    for n in range(3):
        image, label = phantom(seed=10 + n)
        write_nifti(image, root / f"case_{n}.nii.gz")
        write_nifti(label, mounts["finals"] / f"case_{n}.nii.gz")
    write_nifti(phantom(seed=20)[0], root / "spare.nii.gz")
    (root / "labels.yaml").write_text("organ: 1\n")
    log = root.parent / "server.log"
    srv = Server(
        root, models_dir, log,
        extra=[("bank.augmentations_per_slice", "0"), ("warm_embeddings", "false"),
               ("storage_retry_seconds", str(RETRY_SECONDS))],
    ).start()
    srv.wait_ready()
    srv.wait_bank_idle()
    yield srv
    srv.stop()


def put_image(server: Server, image_id: str, path: Path) -> tuple[int, str]:
    return server.request("PUT", f"/datastore/?image={image_id}", files={"file": str(path)})


def put_label(server: Server, image_id: str, path: Path, tag: str = "final") -> tuple[int, str]:
    return server.request("PUT", f"/datastore/label?image={image_id}&tag={tag}", files={"label": str(path)})


def delete_label(server: Server, image_id: str, tag: str = "final") -> tuple[int, str]:
    return server.request("DELETE", f"/datastore/label?id={image_id}&tag={tag}")


def listed_ids(server: Server) -> set[str]:
    status, body = server.request("GET", "/datastore/?output=all")
    assert status == 200, body
    return set(json.loads(body)["objects"])


def until(check, timeout: float = NOTICE_TIMEOUT, what: str = "", server: Server | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    log = server.log()[-3000:] if server else ""
    raise ServerFailed(f"not within {timeout} s: {what}\n{log}")


def bank_matches_datastore(server: Server, root: Path) -> bool:
    bank = server.bank()
    finals = {p.name[: -len(".nii.gz")] for p in (root / "labels" / "final").glob("*.nii.gz")}
    work = bank["ingestion"]
    return set(bank["image_ids"]) == finals and work["state"] == "idle" and not work["pending"] and not work["retrying"]


# ---------------------------------------------------------------------------------------------
# races between requests


def test_an_image_replacement_never_races_a_label_save(server, mounts, volumes):
    """PUT /datastore/image with a 10-slice scan beside PUT /datastore/label for the 20-slice one it
    replaces: one of the two is refused (409 when it lost the race, 422 when it saw the other's
    result), and the datastore never holds a final label that does not fit its image."""
    root = mounts["root"]
    outcomes = []
    for n in range(RACE_ROUNDS):
        case = f"race_{n}"
        assert put_image(server, case, volumes["image"])[0] == 200
        barrier = threading.Barrier(2)
        results: dict[str, tuple[int, str]] = {}

        def run(kind, call):
            barrier.wait()
            results[kind] = call()

        threads = [
            threading.Thread(target=run, args=("image", lambda: put_image(server, case, volumes["short_image"]))),
            threading.Thread(target=run, args=("label", lambda: put_label(server, case, volumes["label"]))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = (results["image"][0], results["label"][0])
        outcomes.append(statuses)
        assert statuses.count(200) == 1, f"round {n}: {results}"
        assert {s for s in statuses if s != 200} <= {409, 422}, f"round {n}: {results}"
        image_shape = nib.load(root / f"{case}.nii.gz").shape
        label = mounts["finals"] / f"{case}.nii.gz"
        if label.exists():
            assert nib.load(label).shape == image_shape, f"round {n}: a stored label does not fit its image"
        assert statuses[0] != 200 or not label.exists()
    print(f"\nrace outcomes (image, label): {outcomes}")
    bank = server.wait_bank_idle()
    assert not bank["ingestion"]["failed"], bank["ingestion"]["failed"]


# ---------------------------------------------------------------------------------------------
# the file watcher


def test_the_watcher_outlives_save_delete_cycles_and_sees_deletions_and_renames(server, mounts, volumes):
    root = mounts["root"]
    for n in range(SAVE_DELETE_CYCLES):
        assert put_label(server, "spare", volumes["label"])[0] == 200, n
        status, body = delete_label(server, "spare")
        assert status == 200, f"cycle {n}: {body}"
    watcher = server.bank()["watcher"]
    assert watcher["state"] == "running", watcher
    assert watcher["errors"] == 0, watcher

    # An image deleted by another tool leaves the listing (and strategies' choices).
    write_nifti(phantom(seed=30)[0], root / "doomed.nii.gz")
    until(lambda: "doomed" in listed_ids(server), what="a new image file is listed", server=server)
    (root / "doomed.nii.gz").unlink()
    until(lambda: "doomed" not in listed_ids(server), what="a deleted image file leaves the listing", server=server)

    # A final label replaced the way most tools write files: a temporary file renamed over it.
    server.wait_bank_idle()
    target = mounts["finals"] / "case_0.nii.gz"
    tmp = mounts["finals"] / ".case_0.nii.gz.partial"
    shutil.copyfile(volumes["other_label"], tmp)
    os.replace(tmp, target)
    new = sha256(target)
    until(
        lambda: server.manifest()["images"]["case_0"]["source"]["label_sha256"] == new,
        what="a label renamed into place is re-ingested", server=server,
    )


# ---------------------------------------------------------------------------------------------
# storage failures


def needs_mounts(mounts):
    if not mounts["mounted"]:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): no full or read-only disk to test on")


def test_an_unwritable_index_refuses_the_save_and_changes_nothing(server, mounts, volumes):
    """The labels folder is writable, the datastore's index is not: the label must not be replaced
    behind a failed answer (it was, and the bank kept the old entries)."""
    needs_mounts(mounts)
    root = mounts["root"]
    server.wait_bank_idle()
    before = tree_digest(root)
    remount(root, read_only=True)
    try:
        status, body = put_label(server, "case_1", volumes["other_label"])
        assert status == 507 and "read-only" in body, (status, body)
        status, body = delete_label(server, "case_2")
        assert status == 507 and "read-only" in body, (status, body)
        status, body = put_label(server, "spare", volumes["label"])
        assert status == 507, (status, body)
    finally:
        remount(root, read_only=False)
    assert tree_digest(root) == before
    server.wait_bank_idle()
    assert bank_matches_datastore(server, root)


def test_a_full_datastore_disk_refuses_the_save_and_changes_nothing(server, mounts, volumes):
    needs_mounts(mounts)
    root = mounts["root"]
    server.wait_bank_idle()
    filler = fill(root)
    try:
        before = tree_digest(root)
        status, body = put_label(server, "case_1", volumes["other_label"])
        assert status == 507 and "full" in body, (status, body)
        status, body = delete_label(server, "case_2")
        assert status in (200, 507), (status, body)  # a rename and a smaller index may still fit
        if status == 507:
            assert tree_digest(root) == before
    finally:
        filler.unlink()
    until(lambda: bank_matches_datastore(server, root), what="the bank matches the datastore", server=server)


def test_a_full_bank_disk_is_reported_then_repaired_once_it_has_room(server, mounts, volumes):
    """The datastore accepts a save and a deletion while the bank's disk is full: /info says the bank
    is behind and why, retries never stop, and once there is room the bank matches the datastore."""
    needs_mounts(mounts)
    root = mounts["root"]
    server.wait_bank_idle()
    assert (mounts["finals"] / "case_1.nii.gz").exists()
    filler = fill(mounts["state"])
    try:
        assert put_label(server, "spare", volumes["label"])[0] == 200
        assert delete_label(server, "case_1")[0] == 200
        work = until(
            lambda: (w := server.bank()["ingestion"])["storage_error"] and {"spare", "case_1"} <= set(w["retrying"]) and w,
            what="/info reports the bank's storage error and both retries", server=server,
        )
        assert "spare" in work["failed"] and "case_1" in work["failed"], work
        time.sleep(3 * RETRY_SECONDS)  # several attempts fail: nothing is given up meanwhile
        work = server.bank()["ingestion"]
        assert {"spare", "case_1"} <= set(work["retrying"]) and work["storage_error"], work
        assert "case_1" in server.bank()["image_ids"]  # its entries could not go yet, and /info says so
    finally:
        filler.unlink()
    until(lambda: bank_matches_datastore(server, root), what="the bank matches the datastore", server=server)
    work = server.bank()["ingestion"]
    assert work["storage_error"] is None and not work["failed"], work


# ---------------------------------------------------------------------------------------------
# the watcher's supervision, in process (no server): a dead observer and a failing handler


@pytest.fixture
def local_datastore(tmp_path):
    """The app's FewshotDatastore on a folder with two images, imported as MONAI Label imports it."""
    import sys

    from app_harness import APP

    sys.path.insert(0, str(APP))
    try:
        from lib.datastore import FewshotDatastore
        from lib.validation import UploadValidator

        class Listener:
            def __init__(self):
                self.changes = 0

            def final_label_saved(self, image_id, reason):
                pass

            def final_label_removed(self, image_id):
                pass

            def datastore_changed(self, delay=0.0):
                self.changes += 1

        for n in range(2):
            write_nifti(phantom(seed=n)[0], tmp_path / f"img_{n}.nii.gz")
        store = FewshotDatastore(str(tmp_path), UploadValidator(lambda: None), Listener(), extensions=["*.nii.gz"], auto_reload=True)
        store.watcher.check_seconds = 0.2
        yield store
        store.watcher.stop()
        store._observer.stop()
    finally:
        sys.path.remove(str(APP))
        for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[name]


def test_a_dead_watcher_is_restarted_and_reported(local_datastore):
    store = local_datastore
    assert store.watcher_status()["state"] == "running"
    store._observer.stop()  # as if its thread had died
    store._observer.join(5)
    status = until(lambda: (s := store.watcher_status())["restarts"] == 1 and s["state"] == "running" and s, 10,
                   "the supervisor restarts the observer")
    assert status["errors"] == 0
    Path(store._datastore_path, "img_1.nii.gz").unlink()
    until(lambda: store.list_images() == ["img_0"], 10, "the restarted watcher notices a deletion")


def test_a_failing_handler_is_counted_and_the_index_reconciled(local_datastore, monkeypatch):
    store = local_datastore
    real = type(store)._reconcile_datastore
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return real(self)

    monkeypatch.setattr(type(store), "_reconcile_datastore", flaky)
    Path(store._datastore_path, "img_1.nii.gz").unlink()
    status = until(lambda: (s := store.watcher_status())["errors"] >= 1 and s, 10, "the handler's error is reported")
    assert "dictionary changed size" in status["last_error"] and status["state"] == "running"
    until(lambda: store.list_images() == ["img_0"], 10, "the reconcile after the error applies the deletion")
    write_nifti(phantom(seed=5)[0], Path(store._datastore_path) / "img_5.nii.gz")
    until(lambda: sorted(store.list_images()) == ["img_0", "img_5"], 10, "the watcher still follows the disk")
