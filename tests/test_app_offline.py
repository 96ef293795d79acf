"""The README's main command on a fresh offline machine: the app on the bundled sample datastore
with the weights-free `classic` preset, no weights anywhere and offline mode on, segments.

Needs nothing outside the repository (sample-datastore is committed), so it also runs where
../shared/data is absent.
"""
from __future__ import annotations

import shutil
import time

import nibabel as nib
import numpy as np
import pytest

from app_harness import PROJECT, Server

SAMPLE = PROJECT / "sample-datastore"
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}  # sample-datastore/labels.yaml


@pytest.mark.server
@pytest.mark.slow
def test_readme_command_serves_the_sample_datastore_offline_with_classic(tmp_path):
    studies = tmp_path / "sample-datastore"  # a copy: the server keeps its bank inside the studies folder
    shutil.copytree(SAMPLE, studies)
    labelled = sorted(p.name for p in (studies / "labels" / "final").glob("*.nii.gz"))
    unlabelled = sorted(p.name for p in studies.glob("*.nii.gz") if p.name not in labelled)
    assert labelled and unlabelled
    models = tmp_path / "models"  # empty: a fresh machine
    models.mkdir()
    offline = {"FEWSHOT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    server = Server(studies, models, tmp_path / "server.log", preset="classic", env=offline).start()
    try:
        info = server.wait_ready()
        model = info["models"]["fewshot"]
        assert "classic" in model["description"]
        assert "few-shot preset 'classic'" in server.log()
        assert {k: v for k, v in model["labels"].items() if k != "background"} == LABELS
        bank = server.wait_bank_idle()
        assert bank["images"] == len(labelled) and not bank["ingestion"]["failed"]

        # The registration workers and fusion's compiled loops start with the server, not with the first Run.
        deadline = time.time() + 120
        while "engine started in" not in server.log() and time.time() < deadline:
            time.sleep(0.5)
        assert "engine started in" in server.log()

        case = unlabelled[0].removesuffix(".nii.gz")
        label_file, result = server.client().infer("fewshot", case, {})
        out, image = nib.load(label_file), nib.load(studies / unlabelled[0])
        assert out.shape == image.shape and np.allclose(out.affine, image.affine, atol=1e-4)
        values = set(np.unique(np.asarray(out.dataobj)).tolist())
        assert values <= {0, *LABELS.values()} and values - {0}, values  # it segments something
        assert set(result["segmented"]) == set(LABELS)
        # /info reports how long a volume takes (MONAI Label's client, as OHIF and Slicer read it).
        timing = server.client().info()["models"]["fewshot"]["seconds_per_volume"]
        assert timing["count"] == 1 and timing["last"] > 0 and timing["last_stages"]["register"] > 0

        proposal = server.client().next_sample("bank_coverage", {})
        assert f"{proposal['id']}.nii.gz" in unlabelled
    finally:
        server.stop()
    # Nothing was fetched or written as a weight: the preset needs none.
    assert not any(models.iterdir()) and not (tmp_path / "hf").exists() and not (tmp_path / "torch").exists()
