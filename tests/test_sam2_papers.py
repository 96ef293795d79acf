"""scripts/sam2_papers.py, the one command for a GPU machine: which eval runs it starts, that it resumes,
and that its table puts each run's own figure in its cell beside the published ones. (The runs
themselves are `fewshot eval`, tested in test_eval_runner; a whole pass takes hours on this CPU.)"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from project_scripts import load_script


@pytest.fixture(scope="module")
def papers():
    return load_script("sam2_papers")


def finish(folder: Path, dice: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"mean_dice": dice}))


def test_each_preset_dataset_and_protocol_runs_once_with_the_passthrough(papers, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, check):
        assert check
        calls.append(cmd)
        finish(Path(cmd[cmd.index("--out") + 1]), 0.5)

    monkeypatch.setattr(subprocess, "run", fake_run)
    passthrough = ["--max-queries", "1", "--set", "random_weights=true"]
    assert papers.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *passthrough]) == 0
    runs = {(c[c.index("--preset") + 1], Path(c[c.index("--data") + 1]).name, c[c.index("--protocol") + 1]) for c in calls}
    assert len(calls) == len(runs) == 12
    assert runs == {(p, d, protocol) for p in papers.PRESETS for d in papers.DATASETS for protocol in ("alpnet", "clinical")}
    for cmd in calls:
        assert cmd[-len(passthrough):] == passthrough
        assert ("--shots" in cmd) == (cmd[cmd.index("--protocol") + 1] == "clinical")
    calls.clear()  # a second call resumes: every run finished, none starts again
    papers.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert calls == []
    papers.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "subset"), "--presets", "rag-sam2",
                 "--datasets", "cmr-bssfp"])
    assert [(c[c.index("--preset") + 1], Path(c[c.index("--data") + 1]).name) for c in calls] == [("rag-sam2", "cmr-bssfp")] * 2
    assert (tmp_path / "subset" / "table.md").read_text().count("| – | 50.0 |") == 2  # CHAOS not run: '–'


def test_the_table_puts_each_runs_figure_in_its_cell(papers, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: pytest.fail(f"a finished run started again: {cmd}"))
    figures = {}
    for i, (preset, dataset, protocol) in enumerate(
            (p, d, pr) for p in papers.PRESETS for d in papers.DATASETS for pr in ("alpnet", "clinical")):
        figures[preset, dataset, protocol] = 0.101 + i / 100
        finish(papers.run_dir(tmp_path, preset, dataset, protocol), figures[preset, dataset, protocol])
    papers.main(["--data", str(tmp_path), "--out", str(tmp_path)])
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")[2:]]
            for line in (tmp_path / "table.md").read_text().splitlines()[2:]}
    for (preset, dataset, protocol), dice in figures.items():
        assert rows[f"`{preset}`", protocol][papers.DATASETS.index(dataset)] == f"{100 * dice:.1f}"
    published = rows["SAM 2-based training-free (published)", "alpnet"]
    assert published == ["83.3", "84.5"]
    (papers.run_dir(tmp_path, "rag-sam2", "cmr-bssfp", "clinical") / "metrics.json").unlink()
    assert "| `rag-sam2` | clinical | " in papers.table(tmp_path)
    assert papers.table(tmp_path).split("| `rag-sam2` | clinical | ")[1].splitlines()[0].endswith("| – |")
