"""Issue 13 for the engine and the CLI: a run never replaces a bank another process holds, settings
that change no stored entry stay out of the bank's fingerprint, `models verify` fails on missing
weights and names them, a missing weight is one short message, `eval --folds 1` never scores the
support against itself, output labels follow the umask, timings partition the total, and SIGTERM
stops the registration workers with the CLI; labels are written readable as the umask allows by the
engine's own writer, and a label that cannot be read as integer class values (complex voxels) or
whose header does not fit its image (a decompression bomb) is refused before it is decompressed.

Runs on small synthetic volumes and the committed sample datastore: nothing needs ../shared/data.
Another process holding a bank is a real process (a Python one-liner holding the lock).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import PROJECT
from fewshot import bank_holders
from fewshot.bank import BankError
from fewshot.cli.common import choose_bank
from fewshot.folders import bank_dir_for
from fewshot.cli import main as cli_main
from fewshot.config import load_preset
from fewshot.eval import protocols
from fewshot.engine import Engine
from fewshot.segmentation import partition, within_wall
from fewshot.presets import build_steps
from fewshot.volume import VolumeError, read_label, read_volume, write_label
from fewshot.weights import MissingWeightsError
from nifti_files import nifti_bomb

SAMPLE = PROJECT / "sample-datastore"
AFFINE = np.diag([2.5, 2.5, 5.0, 1.0])


# ---------------------------------------------------------------------------------------------
# helpers


def phantom(seed: int, shape=(40, 40, 6)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    organ = ((x - rng.uniform(-0.1, 0.1)) / 0.5) ** 2 + (y / 0.4) ** 2 < 1
    label = np.repeat(organ[:, :, None], shape[2], axis=2).astype(np.uint8)
    image = (100 + 300 * label + rng.normal(0, 5, shape)).astype(np.float32)
    return image, label


def tiny_datastore(root: Path) -> Path:
    """Two labelled images and one to segment."""
    (root / "labels" / "final").mkdir(parents=True)
    for n in range(3):
        image, label = phantom(n)
        nib.save(nib.Nifti1Image(image, AFFINE), root / f"case_{n}.nii.gz")
        if n < 2:
            nib.save(nib.Nifti1Image(label, AFFINE), root / "labels" / "final" / f"case_{n}.nii.gz")
    return root


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".lock", ".holders")}


class Holder:
    """Another process holding a bank directory, as a running server does."""

    def __init__(self, directory: Path):
        code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from fewshot import bank_holders; "
                "bank_holders.hold(sys.argv[1]); print('held', flush=True); time.sleep(600)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(directory), str(PROJECT / "lib")],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# the bank's fingerprint


def fingerprint(preset: str, models_dir=None, **overrides) -> str:
    settings = load_preset(preset, overrides)
    embedder, _, transfer = build_steps(settings, models_dir=models_dir)
    try:
        return Engine.bank_fingerprint(settings, embedder, transfer)
    finally:
        getattr(transfer, "close", lambda: None)()


def test_settings_that_change_no_stored_entry_stay_out_of_the_bank_fingerprint(models_dir):
    # classic and classic-slices store canvas slices and atlases only: fusion, 3D consistency and
    # registration settings change masks, never a stored entry (a CLI run with one of them used to
    # rebuild the bank a server held).
    for preset, changes in (
        ("classic-slices", {"transfer.consistency.largest_component": False, "transfer.consistency.threshold": 0.3,
                            "transfer.fusion.h": 0.5, "transfer.deformable.method": "none"}),
        ("classic", {"transfer.fusion.beta": 3, "transfer.threshold": 0.4, "transfer.deformable.method": "none",
                     "transfer.slices.consistency.largest_component": False, "selection.keep": 2}),
    ):
        base = fingerprint(preset)
        for key, value in changes.items():
            assert fingerprint(preset, **{key: value}) == base, key
        # What the bank stores still changes it.
        assert fingerprint(preset, **{"volume.canvas": 128}) != base
        assert fingerprint(preset, **{"bank.negatives_per_image": 1}) != base
    # SAM 2: its memories depend on the network, its input size and how supports are encoded, not on
    # how outputs are thresholded or propagated.
    base = fingerprint("random-tiny", models_dir)
    for key, value in {"transfer.mask_threshold": 0.5, "transfer.neighbours": 1, "retrieval.top_k": 4,
                       "selection.keep": 2}.items():
        assert fingerprint("random-tiny", models_dir, **{key: value}) == base, key
    assert fingerprint("random-tiny", models_dir, **{"transfer.image_size": 64}) != base


# ---------------------------------------------------------------------------------------------
# a bank another process holds


@pytest.fixture
def released():
    """Bank directories choose_bank held in this process are let go after the test (cli.main does it
    at the end of a command)."""
    from fewshot.cli.common import release_held

    yield
    release_held()


def test_a_run_with_other_settings_never_replaces_a_bank_another_process_holds(tmp_path, released):
    shared = tmp_path / ".fewshot" / "bank-classic"
    shared.mkdir(parents=True)
    manifest = json.dumps({"version": 2, "fingerprint": "the-servers-settings", "images": {}})
    (shared / "manifest.json").write_text(manifest)
    holder = Holder(shared)
    try:
        assert bank_holders.used_elsewhere(shared)
        # Default bank: one of its own beside the shared one, the same one for the same settings.
        own = choose_bank(shared, "this-runs-settings", overridden=False, explicit=False)
        assert own.parent == shared.parent and own.name.startswith("bank-classic-") and own != shared
        assert choose_bank(shared, "this-runs-settings", overridden=True, explicit=False) == own
        # The same settings share it; an explicit --bank with other settings is refused with the reason.
        assert choose_bank(shared, "the-servers-settings", overridden=True, explicit=False) == shared
        with pytest.raises(BankError, match="another process .* is using it"):
            choose_bank(shared, "this-runs-settings", overridden=False, explicit=True)
    finally:
        holder.stop()
    assert (shared / "manifest.json").read_text() == manifest
    # Nobody holds it: a stale bank is rebuilt in place, unless this run's own --set made it differ.
    assert not bank_holders.used_elsewhere(shared)
    assert choose_bank(shared, "this-runs-settings", overridden=False, explicit=False) == shared
    assert choose_bank(shared, "this-runs-settings", overridden=True, explicit=False) == own


def test_segment_beside_a_server_shares_or_builds_its_own_bank(tmp_path, models_dir):
    """The issue's run, in process: a server (another process) holds the datastore's bank; `segment`
    with post-processing settings uses it untouched, with `bank.*` settings builds its own beside it.
    Output labels are readable by others as the umask allows (they were 0600), and the sidecar's
    stages add up to its total."""
    store = tiny_datastore(tmp_path / "store")
    base = ["--preset", "random-tiny", "--models-dir", str(models_dir)]
    assert cli_main(["bank", "build", "--datastore", str(store), *base]) == 0
    shared = bank_dir_for(store, "random-tiny")
    before = digest(shared)
    holder = Holder(shared)
    try:
        out = tmp_path / "a.nii.gz"
        assert cli_main(["segment", "--image", str(store / "case_2.nii.gz"), "--support", str(store), "--output", str(out),
                         *base, "--set", "transfer.mask_threshold=0.5", "--set", "retrieval.top_k=4"]) == 0
        assert digest(shared) == before
        assert not [p for p in shared.parent.iterdir() if p.name.startswith("bank-random-tiny-")]
        assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()
        sidecar = json.loads(out.with_name("a.json").read_text())
        timings = sidecar["timings"]
        assert abs(sum(v for k, v in timings.items() if k not in ("total", "slices", "reused")) - timings["total"]) <= 1e-3
        out = tmp_path / "b.nii.gz"
        assert cli_main(["segment", "--image", str(store / "case_2.nii.gz"), "--support", str(store), "--output", str(out),
                         *base, "--set", "bank.negatives_per_image=1"]) == 0
        assert digest(shared) == before
        [own] = [p for p in shared.parent.iterdir() if p.name.startswith("bank-random-tiny-")]
        assert json.loads((own / "manifest.json").read_text())["images"].keys() == {"case_0", "case_1"}
        assert nib.load(out).shape == nib.load(store / "case_2.nii.gz").shape
    finally:
        holder.stop()


# ---------------------------------------------------------------------------------------------
# weights


def test_models_verify_fails_and_names_what_is_missing(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    run = subprocess.run([sys.executable, "-m", "fewshot", "models", "verify", "--models-dir", str(empty)],
                         cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "missing: dinov2-vits14, lpips-alex, sam2.1-hiera-tiny" in run.stderr
    assert "python -m fewshot models download dinov2-vits14 lpips-alex sam2.1-hiera-tiny" in run.stderr


def test_missing_weights_are_one_short_message(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    with pytest.raises(MissingWeightsError) as error:
        build_steps(load_preset("foundation"), models_dir=empty)
    message = str(error.value)
    assert error.value.missing == ["dinov2-vits14", "lpips-alex", "sam2.1-hiera-tiny"]
    assert len(message) < 600, message
    assert "python -m fewshot models download dinov2-vits14 lpips-alex sam2.1-hiera-tiny" in message
    assert "models list" in message


# ---------------------------------------------------------------------------------------------
# labels read and written by the engine: refused from their header, written readable


def test_written_labels_follow_the_umask(tmp_path):
    """volume.write_label itself (every writer of labels goes through it), not only Segmentation.save:
    it renamed a mkstemp file (0600) into place."""
    image, label = phantom(0)
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "image.nii.gz")
    out = tmp_path / "label.nii.gz"
    write_label(out, label.astype(np.uint16), read_volume(tmp_path / "image.nii.gz"))
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_a_label_bomb_for_a_small_image_is_refused_from_its_header(tmp_path):
    """A 0.5 MB label announcing 512 MiB for a 72 x 64 x 20 image was decompressed in full (and held
    as float32) before its shape was refused; an image announcing 2.55 GB likewise."""
    image = np.random.default_rng(0).normal(100, 10, (72, 64, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "image.nii.gz")
    volume = read_volume(tmp_path / "image.nii.gz")
    label = nifti_bomb(tmp_path / "label.nii.gz", (1024, 1024, 512), AFFINE)
    big = nifti_bomb(tmp_path / "big.nii.gz", (1400, 1400, 1300), AFFINE)
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError, match=r"label shape \(1024, 1024, 512\) does not match image shape \(72, 64, 20\)"):
            read_label(label, volume)
        with pytest.raises(VolumeError, match="2548000000 voxels .* nothing was decompressed"):
            read_volume(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MB held to refuse them"


def test_complex_labels_on_disk_are_refused_by_the_engine_and_the_cli(tmp_path, models_dir):
    """A complex64 final label was ingested with its imaginary part dropped (numpy's ComplexWarning
    alone said so). The engine refuses it, and `bank build` reports it, exits 1 and leaves the label
    file and the other image's entries as they are."""
    store = tiny_datastore(tmp_path / "store")
    path = store / "labels" / "final" / "case_1.nii.gz"
    values = np.asanyarray(nib.load(path).dataobj)
    nib.save(nib.Nifti1Image((values + 1j * values).astype(np.complex64), AFFINE), path)
    before = path.read_bytes()
    volume = read_volume(store / "case_1.nii.gz")
    with pytest.raises(VolumeError, match=r"holds complex voxels \(complex64\)"):
        read_label(path, volume)
    # No augmented copies (not this test's subject): the process then never imports MONAI's
    # augmentation transforms, 10-20 s of CPU.
    run = subprocess.run([sys.executable, "-m", "fewshot", "bank", "build", "--datastore", str(store),
                          "--preset", "random-tiny", "--models-dir", str(models_dir),
                          "--set", "bank.augmentations_per_slice=0"],
                         cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    reconcile = json.loads(run.stdout)["reconcile"]
    assert "complex voxels" in reconcile["failed"]["case_1"] and reconcile["ingested"] == ["case_0"], reconcile
    assert "complex voxels" in run.stderr and "Traceback" not in run.stderr
    assert path.read_bytes() == before
    manifest = json.loads((bank_dir_for(store, "random-tiny") / "manifest.json").read_text())
    assert set(manifest["images"]) == {"case_0"}


# ---------------------------------------------------------------------------------------------
# eval folds, timings


def test_one_alpnet_fold_never_scores_its_support():
    ids = [f"image_{n}" for n in (1, 2, 3, 5, 8)]
    [fold] = protocols.alpnet_folds(ids, 1)
    assert fold.support_id == "image_1" and fold.support_id not in fold.query_ids
    assert fold.query_ids == ("image_2", "image_3", "image_5", "image_8")
    for n_folds in (2, 3, 4):
        for f in protocols.alpnet_folds(ids, n_folds):
            assert f.support_id not in f.query_ids


def test_stages_partition_the_total():
    # Worker processes' seconds (97 s of registration in 54 s) become shares of the wall time.
    assert within_wall({"register": 60.0, "fuse": 37.0}, 54.0) == pytest.approx({"register": 60 * 54 / 97, "fuse": 37 * 54 / 97})
    assert within_wall({"register": 20.0}, 54.0) == {"register": 20.0}
    parts = partition({"prepare_and_embed": 1.23456, "register": 50.0, "postprocess": 0.5}, 54.0)
    assert parts["other"] == pytest.approx(54.0 - 1.2346 - 50.0 - 0.5)
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"]) and parts["total"] == 54.0
    # Stages measured past the total (rounding): nothing negative, and the total is their sum.
    parts = partition({"a": 1.00004, "b": 1.00004}, 2.0)
    assert parts["other"] == 0.0 and parts["total"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# signals


def test_sigterm_stops_the_registration_workers_with_the_cli(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(SAMPLE, store)
    quick = ["--set", "transfer.global_affine.iterations=5", "--set", "transfer.local_affine.iterations=5",
             "--set", "transfer.deformable.method=none", "--set", "transfer.in_plane.method=none"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewshot", "segment", "--image", str(store / "phantom_04.nii.gz"), "--support", str(store),
         "--output", str(tmp_path / "out.nii.gz"), "--preset", "classic", *quick],
        cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "cli.log", "w"), start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.2)
            workers = children(proc.pid)
        assert len(workers) >= 2, "the registration workers never started"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not [p for p in workers if alive(p)], "worker processes outlived the CLI"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in children(proc.pid, group=True):
            os.kill(pid, signal.SIGKILL)


def children(pid: int, group: bool = False) -> list[int]:
    """The multiprocessing worker processes ``pid`` started (by process group: they outlive it)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid,pgid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in out if line.split()[1] == str(pid) and line.split()[0] != str(pid)
            and ("spawn_main" in line or group)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
