"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent) and tiny random networks."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Tests check mechanics, not speed. One intra-op thread keeps them from thrashing when a server
# subprocess (or anything else) shares the two cores; timings live in `python -m fewshot bench`.
torch.set_num_threads(1)

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEWSHOT_SHARED_DATA", PROJECT.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir() or not any(path.glob("image_*")):
        pytest.skip(f"real data {path} is absent (it lives in ../shared/data beside the project)")
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """One models directory per test session: random-tiny checkpoints are generated here once,
    then loaded through the same loading code as real weights."""
    path = tmp_path_factory.mktemp("models")
    os.environ["FEWSHOT_MODELS_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_settings(models_dir):
    from fewshot.config import load_preset

    return load_preset("random-tiny")


def make_datastore(tmp: Path, source: Path, labelled: list[str], unlabelled: list[str]) -> Path:
    """A MONAI Label local datastore from ``image_N``/``label_N`` pairs: images at the top, final labels below."""
    (tmp / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for case in labelled + unlabelled:
        shutil.copy(source / f"image_{case}.nii.gz", tmp / f"image_{case}.nii.gz")
    for case in labelled:
        shutil.copy(source / f"label_{case}.nii.gz", tmp / "labels" / "final" / f"image_{case}.nii.gz")
    return tmp


# One random-tiny server on a copy of the committed sample datastore, shared by the hostile-request
# and reliability modules (tests/test_app_hostile.py, tests/test_app_reliability.py). Each used to
# start its own with nearly the same settings: a start-up and an ingestion each (15-20 s of a core).
# Its settings are the union of theirs (none of them matters to the other module's requests), and
# every test there snapshots what it checks before its own requests (Unchanged, log offsets), so
# what one test did leaves the others' checks as they were. Its temporary folder is the test's
# own, warm-up is off (nothing writes in the background), and labels/final sits on a tmpfs of its
# own when the test may mount one (root with CAP_SYS_ADMIN; the read-only test skips otherwise).
SAMPLE_SERVER_LIMITS = {"session_max_unpacked_mb": 1, "session_max_files": 20, "max_volume_mb": 256}
SAMPLE_SERVER_MODULES = ("test_app_hostile.py", "test_app_reliability.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's workers (pyproject's addopts: two, one per core) each take whole modules, so that a
    module's fixtures (servers, registrations) start once, and the modules sharing the sample server take it
    together, so that it starts once too. (xdist's own ``loadgroup`` does not group under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "sample-server" if Path(module).name in SAMPLE_SERVER_MODULES else module

    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    """The scheduler above must name every module that uses the sample server, or it would start twice."""
    unnamed = {item.path.name for item in items if "sample_server" in item.fixturenames} - set(SAMPLE_SERVER_MODULES)
    if unnamed:
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(unnamed)} to SAMPLE_SERVER_MODULES")


@pytest.fixture(scope="session")
def sample_server_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample-server")


@pytest.fixture(scope="session")
def sample_finals_mount(sample_server_tmp):
    """labels/final on a tmpfs of its own (remounted read-only alone), or a plain folder."""
    from app_harness import mount_tmpfs, run_quietly

    finals = sample_server_tmp / "datastore" / "labels" / "final"
    mounted = mount_tmpfs(finals, 16)
    yield mounted
    if mounted:
        run_quietly("umount", "-l", str(finals))


@pytest.fixture(scope="session")
def sample_server(sample_server_tmp, sample_finals_mount, models_dir):
    from app_harness import Server

    tmp = sample_server_tmp
    studies = tmp / "datastore"
    shutil.copytree(PROJECT / "sample-datastore", studies, dirs_exist_ok=True)
    (tmp / "tmp").mkdir()
    env = {"TMPDIR": str(tmp / "tmp"), "MONAI_LABEL_SESSION_PATH": str(tmp / "sessions")}
    extra = [("warm_embeddings", "false"), ("bank.augmentations_per_slice", "0"),
             *((key, str(value)) for key, value in SAMPLE_SERVER_LIMITS.items())]
    srv = Server(studies, models_dir, tmp / "server.log", extra=extra, env=env).start()
    srv.wait_ready()
    srv.wait_bank_idle()
    yield srv
    srv.stop()


def release_sample_server(request, server) -> None:
    """At a module's end: stop the shared server when no test after this module asks for it, so that
    it does not sit in memory for the rest of the session (stop() again at the session's end is a no-op)."""
    items = request.session.items
    last = max(i for i, item in enumerate(items) if item.module is request.module)
    if not any("sample_server" in item.fixturenames for item in items[last + 1:]):
        server.stop()
