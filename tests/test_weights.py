"""The weights registry: presence, clear errors, offline refusal, random generation, verification."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from fewshot import files, weights
from fewshot.cli import models as models_cli
from fewshot.config import CONFIGS_DIR
from fewshot.weights import (
    ChecksumMismatchError,
    MissingWeightsError,
    ModelSpec,
    OfflineError,
)

SAM2_PACKAGE = Path(importlib.util.find_spec("sam2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """One models directory with random DINOv2 / LPIPS weights, generated once for the module."""
    root = tmp_path_factory.mktemp("models")
    return root, {
        "dinov2": weights.resolve("dinov2-random-tiny", root),
        "lpips": weights.resolve("lpips-alex", root, random_weights=True),
    }


def _file_spec(path: Path, root: Path, **kw) -> ModelSpec:
    """A registry entry for a local file, fetched through a file:// URL."""
    return ModelSpec(name="fake", kind="lpips", path=str(path.relative_to(root)), url=path.as_uri(), **kw)


# ---------------------------------------------------------------------------------------------


def test_registry_lists_the_real_models_with_their_sources():
    reg = weights.load_registry()
    sam2 = {"sam2.1-hiera-tiny": "t", "sam2.1-hiera-small": "s", "sam2.1-hiera-base-plus": "b+", "sam2.1-hiera-large": "l"}
    for name, size in sam2.items():
        spec = reg[name]
        assert spec.kind == "sam2" and not spec.random_only
        assert spec.url.startswith("https://dl.fbaipublicfiles.com/segment_anything_2/092824/")
        assert spec.url.endswith("/" + Path(spec.path).name)
        assert spec.sam2_config == f"configs/sam2.1/sam2.1_hiera_{size}.yaml"
        assert (SAM2_PACKAGE / spec.sam2_config).is_file()
        assert len(spec.sha256["."]) == 64 and spec.size > 100_000_000
    assert reg["dinov2-vits14"].repo == "facebook/dinov2-small"
    assert reg["dinov2-vitb14"].repo == "facebook/dinov2-base"
    for name in ("dinov2-vits14", "dinov2-vitb14"):
        assert reg[name].is_directory and "model.safetensors" in reg[name].sha256
        assert reg[name].architecture["patch_size"] == 14
    alex = reg["lpips-alex"]
    assert alex.url == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    assert alex.sha256 == {".": "7be5be79"}  # torchvision publishes only this prefix
    for name in ("sam2-random-tiny", "dinov2-random-tiny"):
        assert reg[name].random_only and not reg[name].url and not reg[name].repo
    assert (CONFIGS_DIR / reg["sam2-random-tiny"].sam2_config).is_file()


def test_presets_name_registry_models():
    from fewshot.config import available_presets, load_preset

    reg = weights.load_registry()
    for preset in available_presets():
        for name in weights.preset_models(load_preset(preset)):
            assert name in reg
    assert weights.preset_models(load_preset("foundation")) == ["dinov2-vits14", "lpips-alex", "sam2.1-hiera-tiny"]


def test_models_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEWSHOT_MODELS_DIR", str(tmp_path / "env"))
    assert weights.models_dir() == (tmp_path / "env").resolve()
    assert weights.models_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv("FEWSHOT_MODELS_DIR")
    assert weights.models_dir() == weights.PROJECT_ROOT / "models"


def test_missing_weights_error_names_path_and_command(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        weights.resolve("sam2.1-hiera-tiny", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "sam2" / "sam2.1_hiera_tiny.pt") in message
    assert f"python -m fewshot models download sam2.1-hiera-tiny --models-dir {tmp_path}" in message
    assert "air-gapped" in message
    with pytest.raises(MissingWeightsError, match="dinov2-small"):
        weights.resolve("dinov2-vits14", tmp_path)
    with pytest.raises(weights.ConfigError, match="unknown model"):
        weights.resolve("no-such-model", tmp_path)


@pytest.mark.parametrize("variable", ["FEWSHOT_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_download_refuses_without_network(monkeypatch, tmp_path, variable):
    monkeypatch.delenv("FEWSHOT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access in offline mode")

    monkeypatch.setattr(weights.urllib.request, "urlopen", no_network)
    assert weights.offline()
    for name in ("lpips-alex", "dinov2-vits14"):
        with pytest.raises(OfflineError, match="offline"):
            weights.download(["dinov2-random-tiny", name], tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_random_weights_load_through_the_real_loaders(random_models):
    import lpips
    import torch
    from transformers import Dinov2Model

    from fewshot.match.lpips_match import load_alexnet_trunk

    root, paths = random_models
    assert paths["dinov2"] == root / "random" / "dinov2-random-tiny"
    assert paths["lpips"] == root / "random" / "lpips-alex" / "alexnet-owt-7be5be79.pth"
    for path in paths.values():
        readme = (path if path.is_dir() else path.parent) / "README.txt"
        assert "random weights, meaningless output" in readme.read_text()
    model = Dinov2Model.from_pretrained(paths["dinov2"])
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).net
    load_alexnet_trunk(net, paths["lpips"])
    saved = torch.load(paths["lpips"], weights_only=True)
    assert torch.equal(net.slice1[0].weight, saved["features.0.weight"])
    assert torch.equal(getattr(net.slice5, "10").bias, saved["features.10.bias"])  # torchvision index kept
    # the real location stays empty: random weights never masquerade as the real file
    with pytest.raises(MissingWeightsError):
        weights.resolve("lpips-alex", root)


def test_random_weights_are_generated_once(random_models):
    root, paths = random_models
    before = {p: p.stat().st_mtime_ns for p in paths["dinov2"].iterdir()}
    assert weights.resolve("dinov2-random-tiny", root) == paths["dinov2"]
    assert {p: p.stat().st_mtime_ns for p in paths["dinov2"].iterdir()} == before
    assert not [p for p in (root / "random").iterdir() if p.name.startswith(".")]  # no temp leftovers
    fp = weights.checkpoint_fingerprint(paths["dinov2"])
    assert fp == weights.checkpoint_fingerprint(paths["dinov2"]) and len(fp) == 64


def test_random_sam2_checkpoint_loads(tmp_path):
    from fewshot.transfer.sam2_model import build_sam2_model

    spec = weights.load_registry()["sam2-random-tiny"]
    path = weights.resolve("sam2-random-tiny", tmp_path)  # random_only: no flag needed
    assert path == tmp_path / "random" / "sam2-random-tiny" / "sam2_random_tiny.pt"
    model = build_sam2_model(spec.sam2_config, path, "cpu", 128)
    assert model.image_size == 128


def test_verify_detects_a_corrupted_file(tmp_path):
    path = tmp_path / "lpips" / "weights.pth"
    path.parent.mkdir()
    path.write_bytes(os.urandom(4096))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    registry = {"fake": _file_spec(path, tmp_path, sha256={".": digest}, size=4096)}
    [result] = weights.verify(["fake"], tmp_path, registry=registry)
    assert result.status == "ok" and result.ok
    assert weights.resolve("fake", tmp_path, registry=registry) == path

    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    [result] = weights.verify(["fake"], tmp_path, registry=registry)
    assert result.status == "mismatch" and not result.ok and digest in result.detail
    with pytest.raises(ChecksumMismatchError, match="--force"):
        weights.resolve("fake", tmp_path, registry=registry)

    path.write_bytes(b"short")
    [result] = weights.verify(["fake"], tmp_path, registry=registry)
    assert result.status == "mismatch" and "size" in result.detail


def test_verify_prefix_and_unpublished_checksums(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"x" * 1000)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    prefix = {"fake": _file_spec(path, tmp_path, sha256={".": digest[:8]})}
    assert weights.verify(["fake"], tmp_path, registry=prefix)[0].status == "prefix"
    wrong_prefix = {"fake": _file_spec(path, tmp_path, sha256={".": "00000000" if digest[:8] != "00000000" else "11111111"})}
    assert weights.verify(["fake"], tmp_path, registry=wrong_prefix)[0].status == "mismatch"
    unpublished = {"fake": _file_spec(path, tmp_path)}
    result = weights.verify(["fake"], tmp_path, registry=unpublished)[0]
    assert result.status == "size-only" and "no published checksum, size only" in result.detail


def test_checksum_cache_follows_the_file(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    assert files.remembered_sha256(path) is None
    digest = files.file_sha256(path, remember=True)
    assert digest == hashlib.sha256(b"abc").hexdigest()
    assert files.remembered_sha256(path) == digest
    path.write_bytes(b"abd")
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse-clock filesystems
    assert files.remembered_sha256(path) is None
    assert files.file_sha256(path, remember=True) == hashlib.sha256(b"abd").hexdigest()
    memo = files.DigestMemo()  # the same rule kept in memory (a datastore's images: no cache file beside them)
    assert memo.sha256(path) == hashlib.sha256(b"abd").hexdigest()
    path.write_bytes(b"abe")
    os.utime(path, ns=(2, 2))
    assert memo.sha256(path) == hashlib.sha256(b"abe").hexdigest()


def test_download_verifies_before_keeping(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSHOT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = tmp_path / "source" / "weights.pth"
    source.parent.mkdir()
    source.write_bytes(os.urandom(10_000))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    root = tmp_path / "models"
    good = {"fake": ModelSpec(name="fake", kind="lpips", path="lpips/w.pth", url=source.as_uri(), sha256={".": digest})}
    [result] = weights.download(["fake"], root, registry=good)
    assert result.status == "downloaded" and (root / "lpips" / "w.pth").read_bytes() == source.read_bytes()
    assert weights.download(["fake"], root, registry=good)[0].status == "present"

    bad = {"fake": ModelSpec(name="fake", kind="lpips", path="lpips/v.pth", url=source.as_uri(), sha256={".": "0" * 64})}
    with pytest.raises(ChecksumMismatchError, match="nothing was kept"):
        weights.download(["fake"], root, registry=bad)
    assert sorted(p.name for p in (root / "lpips").iterdir() if not p.name.startswith(".")) == ["w.pth"]


def test_models_command_line(tmp_path, capsys, random_models):
    root, _ = random_models
    parser = argparse.ArgumentParser()
    models_cli.add_models_command(parser.add_subparsers(dest="command"))

    assert models_cli.main(parser.parse_args(["models", "list", "--models-dir", str(root), "--json"])) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["dinov2-random-tiny"]["present"] and not rows["sam2.1-hiera-large"]["present"]
    assert rows["lpips-alex"]["sha256"] == "published"

    # verify checks the default preset's models: all missing here, so it fails and names them (issue 13:
    # it used to exit 0 with every downloadable weight missing)
    assert models_cli.main(parser.parse_args(["models", "verify", "--models-dir", str(root)])) == 1
    captured = capsys.readouterr()
    assert "sam2.1-hiera-tiny" in captured.out and "missing" in captured.out
    assert "missing: dinov2-vits14, lpips-alex, sam2.1-hiera-tiny" in captured.err
    assert "python -m fewshot models download dinov2-vits14 lpips-alex sam2.1-hiera-tiny" in captured.err
    # an explicitly named model that is missing is a failure; generated random weights pass
    assert models_cli.main(parser.parse_args(["models", "verify", "lpips-alex", "--models-dir", str(root)])) == 1
    assert models_cli.main(parser.parse_args(["models", "verify", "dinov2-random-tiny", "--models-dir", str(root)])) == 0
    capsys.readouterr()


def test_repo_download_lands_complete_and_checked(tmp_path, monkeypatch):
    """snapshot_download replaced by a fake that writes the files: the directory is swapped in
    only after its digests match, and a bad download leaves nothing behind."""
    import huggingface_hub

    monkeypatch.delenv("FEWSHOT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload = b"safetensors bytes"
    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
        (Path(local_dir) / "model.safetensors").write_bytes(payload)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    spec = dict(kind="dinov2", repo="org/model", revision="main", allow_patterns=("config.json", "model.safetensors"))
    good = {"m": ModelSpec(name="m", path="dinov2/m", sha256={"model.safetensors": hashlib.sha256(payload).hexdigest()}, **spec)}
    [result] = weights.download(["m"], tmp_path, registry=good)
    assert result.status == "downloaded" and calls == [("org/model", "main", ["config.json", "model.safetensors"])]
    assert weights.resolve("m", tmp_path, registry=good) == tmp_path / "dinov2" / "m"
    assert not (tmp_path / "dinov2" / "m.part").exists()

    bad = {"b": ModelSpec(name="b", path="dinov2/b", sha256={"model.safetensors": "f" * 64}, **spec)}
    with pytest.raises(ChecksumMismatchError):
        weights.download(["b"], tmp_path, registry=bad)
    assert sorted(p.name for p in (tmp_path / "dinov2").iterdir()) == ["m"]


def test_registry_rejects_malformed_checksums(tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("m:\n  kind: lpips\n  path: m.pth\n  url: https://example.invalid/m.pth\n  sha256: ''\n")
    with pytest.raises(weights.ConfigError, match="hex"):
        weights.load_registry(bad)
    bad.write_text("m:\n  kind: lpips\n  path: m.pth\n  url: https://example.invalid/m.pth\n  sizee: 3\n")
    with pytest.raises(weights.ConfigError, match="unknown keys"):
        weights.load_registry(bad)
