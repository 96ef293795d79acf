"""Network weights: the registry in ``configs/models.yaml``, where files live, download, verification.

Real weights are fetched once (``python -m fewshot models download``) into the models directory
and checked against published sha256 digests. Random weights of the same architectures are
generated on demand under ``<models dir>/random/<name>/`` and loaded back by the very same
loaders, so timing runs and tests exercise the real code paths without any download.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import yaml

from fewshot.config import CONFIGS_DIR, ConfigError
from fewshot.files import atomic_path, default_mode, file_sha256, remember_sha256, remembered_sha256

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_FILE = CONFIGS_DIR / "models.yaml"
KINDS = ("sam2", "dinov2", "lpips")
RANDOM_SUBDIR = "random"
RANDOM_README = "random weights, meaningless output"
RANDOM_SEED = 0
DOWNLOAD_COMMAND = "python -m fewshot models download"
# The preset section that uses each kind of model, and the `type` that section must have.
PRESET_SECTIONS = {"dinov2": "embedder", "lpips": "matcher", "sam2": "transfer"}


class WeightsError(RuntimeError):
    """Weights that cannot be used; the message says what to do."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    pass


class ChecksumMismatchError(WeightsError):
    pass


class OfflineError(WeightsError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry (see the header of configs/models.yaml for the fields)."""

    name: str
    kind: str
    path: str  # relative to the models directory
    description: str = ""
    url: str | None = None
    repo: str | None = None
    revision: str | None = None
    allow_patterns: tuple[str, ...] = ()
    sha256: Mapping[str, str] = field(default_factory=dict)  # "." = the file itself
    size: int | None = None
    sam2_config: str | None = None
    architecture: Mapping[str, object] = field(default_factory=dict)
    random_only: bool = False
    license: str | None = None

    @property
    def is_directory(self) -> bool:
        # DINOv2 weights are a transformers model directory (config.json + model.safetensors).
        return self.kind == "dinov2"

    def local_path(self, root: Path) -> Path:
        return root / self.path

    def random_path(self, root: Path) -> Path:
        folder = root / RANDOM_SUBDIR / self.name
        return folder if self.is_directory else folder / Path(self.path).name

    def required_files(self) -> list[str]:
        """Files that must exist inside a model directory for it to count as present."""
        names = {"config.json"} | {k for k in self.sha256 if k != "."}
        names |= {p for p in self.allow_patterns if not any(c in p for c in "*?[")}
        return sorted(names)


@dataclass
class VerifyResult:
    name: str
    path: Path
    status: str  # ok | prefix | size-only | missing | mismatch | random
    detail: str

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "prefix", "size-only", "random")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["ok"] = self.ok
        return d


@dataclass
class DownloadResult:
    name: str
    path: Path
    status: str  # downloaded | present | generated
    detail: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ---------------------------------------------------------------------------------------------
# registry and locations


def load_registry(path: Path | None = None) -> dict[str, ModelSpec]:
    path = Path(path) if path else REGISTRY_FILE
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    known = set(ModelSpec.__dataclass_fields__) - {"name"}
    registry: dict[str, ModelSpec] = {}
    for name, entry in raw.items():
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(f"{path}: model {name!r} has unknown keys {sorted(unknown)}")
        entry = dict(entry)
        digest = entry.get("sha256")
        entry["sha256"] = {".": str(digest)} if isinstance(digest, (str, int)) else {
            str(k): str(v) for k, v in (digest or {}).items()
        }
        entry["allow_patterns"] = tuple(entry.get("allow_patterns") or ())
        entry["architecture"] = dict(entry.get("architecture") or {})
        spec = ModelSpec(name=str(name), **entry)
        if spec.kind not in KINDS:
            raise ConfigError(f"{path}: model {name!r} has kind {spec.kind!r}; expected one of {KINDS}")
        if not spec.random_only and not (spec.url or spec.repo):
            raise ConfigError(f"{path}: model {name!r} needs a url or a repo (or random_only: true)")
        for rel, digest in spec.sha256.items():
            if not (8 <= len(digest) <= 64 and all(c in "0123456789abcdefABCDEF" for c in digest)):
                raise ConfigError(f"{path}: model {name!r}: sha256 {digest!r} is not 8 to 64 hex digits")
            if (rel == ".") == spec.is_directory:
                raise ConfigError(
                    f"{path}: model {name!r}: give sha256 as "
                    + ("file -> digest for a model directory" if spec.is_directory else "one digest for a file")
                )
        registry[spec.name] = spec
    return registry


def get_spec(name: str, registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(registry))}")
    return registry[name]


def models_dir(override: str | Path | None = None) -> Path:
    """override > $FEWSHOT_MODELS_DIR > <project root>/models."""
    chosen = override or os.environ.get("FEWSHOT_MODELS_DIR") or PROJECT_ROOT / "models"
    return Path(chosen).expanduser().resolve()


def _models_dir(value: str | Path | None) -> Path:
    # for functions whose ``models_dir`` argument shadows models_dir()
    return models_dir(value)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in ("FEWSHOT_OFFLINE", "HF_HUB_OFFLINE"))


def preset_models(settings: Mapping) -> list[str]:
    """The registry names a preset's steps load (a section counts only if its type uses a network)."""
    registry = load_registry()
    names = []
    for kind, section_name in PRESET_SECTIONS.items():
        section = settings.get(section_name) or {}
        name = section.get("model")
        if name and section.get("type") == kind and name in registry:
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# checksums: fewshot.files keeps each file's digest beside it (.sha256-cache.json, trusted while its
# size, mtime and inode hold), so a large checkpoint is hashed once, not at every start


def _weight_files(folder: Path) -> list[Path]:
    """Files of a model directory, hidden ones (.cache/, the checksum cache) excluded."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of the sorted (name, sha256) list of a model directory."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path, remember=True)
    if path.is_dir():
        h = hashlib.sha256()
        for p in _weight_files(path):
            h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p, remember=True)}\n".encode())
        return h.hexdigest()
    raise MissingWeightsError(f"cannot fingerprint {path}: no such file or directory")


def _digest_matches(actual: str, expected: str) -> bool:
    return actual.lower().startswith(expected.lower())


def _is_prefix(expected: str) -> bool:
    return len(expected) < 64


# ---------------------------------------------------------------------------------------------
# presence and verification


def _present(spec: ModelSpec, path: Path) -> bool:
    if spec.is_directory:
        return path.is_dir() and all((path / f).is_file() for f in spec.required_files())
    return path.is_file()


def _check(spec: ModelSpec, path: Path, use_cache: bool = True) -> VerifyResult:
    """Compare what is on disk at ``path`` with what the registry publishes for ``spec``."""
    if not _present(spec, path):
        return VerifyResult(spec.name, path, "missing", f"not found at {path}")
    checks: list[tuple[Path, str]] = []
    for rel, expected in spec.sha256.items():
        checks.append((path if rel == "." else path / rel, expected))
    if spec.size is not None and not spec.is_directory:
        actual_size = path.stat().st_size
        if actual_size != spec.size:
            return VerifyResult(
                spec.name, path, "mismatch", f"size {actual_size} bytes, expected {spec.size}: incomplete or another file"
            )
    if not checks:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in _weight_files(path))
        detail = f"no published checksum, size only ({size} bytes"
        detail += ", as published)" if spec.size is not None else ")"
        return VerifyResult(spec.name, path, "size-only", detail)
    prefix_only = False
    for file, expected in checks:
        actual = file_sha256(file, remember=use_cache)
        if not _digest_matches(actual, expected):
            return VerifyResult(
                spec.name, path, "mismatch", f"sha256 of {file.name} is {actual}, expected {expected}"
            )
        prefix_only |= _is_prefix(expected)
    if prefix_only:
        return VerifyResult(spec.name, path, "prefix", "sha256 matches the published prefix (the full digest is not published)")
    return VerifyResult(spec.name, path, "ok", "sha256 matches the published digest")


def _source(spec: ModelSpec) -> str:
    return spec.url or f"https://huggingface.co/{spec.repo} ({', '.join(spec.required_files())})"


def _missing_message(spec: ModelSpec, path: Path, root: Path) -> str:
    what = "directory" if spec.is_directory else "file"
    source = _source(spec)
    command = f"{DOWNLOAD_COMMAND} {spec.name}"
    if root != models_dir():
        command += f" --models-dir {root}"
    incomplete = " (incomplete)" if path.exists() else ""
    return (
        f"weights of {spec.name!r} not found: expected the {what} {path}{incomplete}. "
        f"Fetch them with `{command}`; on an air-gapped machine, download {source} elsewhere "
        f"and copy it to {path}. For timing without weights, use the foundation-random preset."
    )


# ---------------------------------------------------------------------------------------------
# random weights of the real architectures


def _generate_sam2(spec: ModelSpec, out: Path) -> None:
    from fewshot.transfer.sam2_model import save_random_checkpoint  # heavy: sam2, hydra

    save_random_checkpoint(
        spec.sam2_config, out, seed=RANDOM_SEED, object_score_bias=spec.architecture.get("object_score_bias")
    )


def _generate_dinov2(spec: ModelSpec, out: Path) -> None:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = Dinov2Model(Dinov2Config(**spec.architecture))
    model.save_pretrained(out)


def _generate_lpips(spec: ModelSpec, out: Path) -> None:
    import torch
    from torchvision.models import alexnet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = alexnet(weights=None)
    # Same key layout as torchvision's file (features.N.weight, ...). Only the convolutional
    # trunk is kept: LPIPS never uses the classifier, which would add 230 MB of random numbers.
    state = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save(state, out)


GENERATORS: dict[str, Callable[[ModelSpec, Path], None]] = {
    "sam2": _generate_sam2,
    "dinov2": _generate_dinov2,
    "lpips": _generate_lpips,
}


def ensure_random(spec: ModelSpec, root: Path) -> Path:
    """Random weights of ``spec``'s architecture, generated once under ``root/random/<name>/``.

    Built in a temporary directory and renamed into place, so concurrent callers and crashes
    never see a half-written model: the first rename wins, the others discard their copy.
    """
    final = spec.random_path(root)
    folder = root / RANDOM_SUBDIR / spec.name
    if _present(spec, final):
        return final
    if folder.exists():
        raise WeightsError(f"{folder} exists but does not hold {final.name}; delete it to regenerate the random weights")
    (root / RANDOM_SUBDIR).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root / RANDOM_SUBDIR, prefix=f".{spec.name}."))
    try:
        os.chmod(tmp, default_mode(0o777))  # mkdtemp's 0700 would survive the rename
        logger.info("generating random weights for %s (%s) under %s", spec.name, spec.kind, folder)
        GENERATORS[spec.kind](spec, tmp if spec.is_directory else tmp / final.name)
        (tmp / "README.txt").write_text(
            f"{RANDOM_README}\n\nRandomly initialised {spec.kind} weights of the {spec.name!r} architecture "
            f"(seed {RANDOM_SEED}), generated by fewshot.weights for tests and timing.\n"
        )
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _present(spec, final):
                raise
            logger.debug("another process generated %s first", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# the public operations


def resolve(
    name: str,
    models_dir: str | Path | None = None,
    random_weights: bool = False,
    registry: Mapping[str, ModelSpec] | None = None,
) -> Path:
    """The local checkpoint file (a directory for DINOv2) of model ``name``, ready to load."""
    spec = get_spec(name, registry)
    root = _models_dir(models_dir)
    if random_weights or spec.random_only:
        return ensure_random(spec, root)
    path = spec.local_path(root)
    if not _present(spec, path):
        raise MissingWeightsError(_missing_message(spec, path, root))
    result = _check(spec, path)
    if result.status == "mismatch":
        raise ChecksumMismatchError(
            f"weights of {name!r} at {path} fail verification: {result.detail}. "
            f"Fetch them again with `{DOWNLOAD_COMMAND} {name} --force`."
        )
    return path


def verify(
    names: Iterable[str] | None = None,
    models_dir: str | Path | None = None,
    registry: Mapping[str, ModelSpec] | None = None,
    use_cache: bool = True,
) -> list[VerifyResult]:
    """Check each model on disk against the registry (all models when ``names`` is empty)."""
    registry = load_registry() if registry is None else registry
    root = _models_dir(models_dir)
    results = []
    for name in list(names or registry):
        spec = get_spec(name, registry)
        if spec.random_only:
            path = spec.random_path(root)
            state = "generated" if _present(spec, path) else "generated on first use"
            results.append(VerifyResult(name, path, "random", f"{RANDOM_README}; {state}"))
        else:
            results.append(_check(spec, spec.local_path(root), use_cache=use_cache))
    return results


def list_models(
    models_dir: str | Path | None = None, registry: Mapping[str, ModelSpec] | None = None
) -> list[dict]:
    """One row per registry entry; uses cached checksums only, so listing never hashes."""
    registry = load_registry() if registry is None else registry
    root = _models_dir(models_dir)
    rows = []
    for spec in registry.values():
        path = spec.random_path(root) if spec.random_only else spec.local_path(root)
        present = _present(spec, path)
        size = None
        if present:
            size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in _weight_files(path))
        if spec.random_only:
            checksum = "random weights"
        elif not spec.sha256:
            checksum = "no published checksum, size only"
        elif not present:
            checksum = "published"
        else:
            files = [(path if rel == "." else path / rel, exp) for rel, exp in spec.sha256.items()]
            digests = [remembered_sha256(f) if f.is_file() else None for f, _ in files]
            if any(d is None for d in digests):
                checksum = "published, not verified yet"
            elif all(_digest_matches(d, exp) for d, (_, exp) in zip(digests, files)):
                checksum = "verified"
            else:
                checksum = "MISMATCH"
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "description": spec.description,
                "present": present,
                "path": str(path),
                "size": size,
                "sha256": checksum,
                "source": spec.url or spec.repo or "generated locally",
            }
        )
    return rows


def download(
    names: Sequence[str],
    models_dir: str | Path | None = None,
    force: bool = False,
    registry: Mapping[str, ModelSpec] | None = None,
) -> list[DownloadResult]:
    """Fetch (or, for random_only models, generate) each model; verified before it is kept.

    In offline mode nothing is fetched: if any named model would need the network, the call
    refuses before touching the disk and says where to copy the files instead.
    """
    registry = load_registry() if registry is None else registry
    root = _models_dir(models_dir)
    specs = [get_spec(n, registry) for n in names]
    needed = [
        s for s in specs
        if not s.random_only
        and (force or not _present(s, s.local_path(root)) or _check(s, s.local_path(root)).status == "mismatch")
    ]
    if needed and offline():
        copies = "; ".join(f"{_source(s)} -> {s.local_path(root)}" for s in needed)
        raise OfflineError(
            "offline mode is on (FEWSHOT_OFFLINE or HF_HUB_OFFLINE), so nothing is downloaded. "
            f"Copy from a machine with internet: {copies}"
        )
    results = []
    for spec in specs:
        path = spec.local_path(root)
        if spec.random_only:
            results.append(DownloadResult(spec.name, ensure_random(spec, root), "generated", RANDOM_README))
        elif spec.name not in {s.name for s in needed}:
            results.append(DownloadResult(spec.name, path, "present", "already downloaded; --force fetches it again"))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if spec.url:
                _download_url(spec, path)
            else:
                _download_repo(spec, path)
            results.append(DownloadResult(spec.name, path, "downloaded", _check(spec, path).detail))
    return results


def _download_url(spec: ModelSpec, path: Path) -> None:
    """Stream to a temporary sibling while hashing, check, then rename: the final name is only ever complete."""
    from tqdm import tqdm

    h = hashlib.sha256()
    logger.info("downloading %s from %s", spec.name, spec.url)
    with atomic_path(path) as part:  # removed if the download fails or its digest is wrong
        request = urllib.request.Request(spec.url, headers={"User-Agent": "fewshot"})
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or spec.size
            with tqdm(total=total, unit="B", unit_scale=True, desc=spec.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        digest = h.hexdigest()
        expected = spec.sha256.get(".")
        if expected and not _digest_matches(digest, expected):
            raise ChecksumMismatchError(
                f"download of {spec.name!r} from {spec.url} has sha256 {digest}, expected {expected}; nothing was kept"
            )
    remember_sha256(path, digest)


def _download_repo(spec: ModelSpec, path: Path) -> None:
    """snapshot_download into ``<dir>.part`` (resumable), check digests, swap it into place."""
    from huggingface_hub import snapshot_download

    part = path.with_name(path.name + ".part")
    logger.info("downloading %s from huggingface.co/%s", spec.name, spec.repo)
    snapshot_download(
        spec.repo,
        revision=spec.revision,
        local_dir=part,
        allow_patterns=list(spec.allow_patterns) or None,
    )
    result = _check(spec, part)
    if result.status in ("missing", "mismatch"):
        shutil.rmtree(part, ignore_errors=True)
        raise ChecksumMismatchError(f"download of {spec.name!r} from {spec.repo} failed verification: {result.detail}")
    if path.exists():
        shutil.rmtree(path)
    os.replace(part, path)
