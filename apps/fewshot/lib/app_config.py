"""The app's `-c key value` options, parsed once at start-up.

App keys: ``preset``, ``models_dir``, ``device``, ``labels``, ``warm_embeddings``,
``storage_retry_seconds`` (how often the bank retries while its disk is full or read-only), ``ray_*``
(``/batch/infer`` on Ray: ``lib/ray_batch.py``). Any dotted key
(``-c retrieval.top_k 8``) or top-level preset key is an engine override, applied to the preset's
settings exactly as ``python -m fewshot ... --set key=value`` would.

Label names come from, in order of precedence: ``-c labels liver=1,spleen=2`` (or ``-c labels
path/to/labels.yaml``), a ``labels.yaml`` at the top of the datastore, the preset's ``labels``.

Session archives: ``session_max_unpacked_mb`` and ``session_max_files`` bound what one archive sent
to ``PUT /session/?uncompress=true`` may unpack to (see ``SESSION_KEYS``).

Uploads: ``max_volume_mb`` is the voxel data one uploaded image (``PUT /datastore/image``, an
``/infer`` upload) may decompress to, read from its header before anything is decompressed (413
beyond it). Request bodies are capped from it too (``request_limits``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fewshot.folders import bank_dir_for
from fewshot.config import ConfigError, load_preset, parse_label_map, parse_value

logger = logging.getLogger(__name__)

APP_KEYS = ("preset", "models_dir", "device", "labels", "warm_embeddings", "storage_retry_seconds",
            "ray_address", "ray_workers", "ray_cpus_per_worker", "ray_gpus_per_worker", "ray_case_timeout",  # lib/ray_batch.py
            "pacs_poll_seconds", "dicomweb_search_filter",  # lib/pacs_sync.py, lib/pacs_client.py
            "ohif_dicomweb")  # lib/ohif_pacs.py
DEFAULT_STORAGE_RETRY_SECONDS = 60.0
# A DICOMweb datastore asks the PACS this often for new, changed or removed SEG series (final labels
# stored by any tool): one QIDO search for series and one for SEG series when nothing changed.
DEFAULT_PACS_POLL_SECONDS = 30.0
# Which series are images: every modality (MONAI Label 0.8.5's own default is CT only, which hid MR
# series); SEG, RTSTRUCT and other non-image series never are. -c dicomweb_search_filter narrows it.
DEFAULT_SEARCH_FILTER: dict = {}
SEARCH_FILTER_ENV = "MONAI_LABEL_DICOMWEB_SEARCH_FILTER"
# MONAI Label's own default. `monailabel start_server` exports every setting to the server's
# environment, so this value cannot be told from one a user set: it is taken as "not set" (to mean
# CT only, say so with -c dicomweb_search_filter).
MONAI_LABEL_DEFAULT_FILTER = {"Modality": "CT"}
# What one session archive (PUT /session/?uncompress=true) may unpack to. A session holds one image:
# a thin-slice CT series is 1000-2000 DICOM files of ~0.5 MB (about 1 GB), so 4 GB and 5000 files
# leave room for the largest series, while a small hostile archive cannot fill the disk.
SESSION_KEYS = ("session_max_unpacked_mb", "session_max_files")
DEFAULT_SESSION_MAX_UNPACKED_MB = 4096
DEFAULT_SESSION_MAX_FILES = 5000
# What one uploaded image may decompress to: a 512 x 512 x 2000 int16 whole-body CT is 1 GB, so 2 GB
# leaves room for the largest clinical series, while a 2.5 MB file announcing 2.5 GB is refused.
UPLOAD_KEYS = ("max_volume_mb",)
DEFAULT_MAX_VOLUME_MB = 2048
# Request bodies: an uncompressed volume of max_volume_mb (or a session archive of
# session_max_unpacked_mb) plus this much for its header and the multipart envelope; a JSON body
# (no upload) at most JSON_BODY_LIMIT.
BODY_HEADROOM_MB = 64
JSON_BODY_LIMIT = 16 << 20
# Keys MONAI Label itself reads from the same -c dictionary; not ours to reject.
MONAI_KEYS = ("server_mode",)
DEFAULT_PRESET = "foundation"
DATASTORE_LABELS_FILE = "labels.yaml"
STATE_DIR = ".fewshot"  # inside the datastore: bank(s), cached embeddings, predictions kept for review, the reviews


def _http_url(conf: Mapping[str, str], key: str) -> str:
    value = str(conf.get(key) or "").strip()
    if value and not value.lower().startswith(("http://", "https://")):
        raise ConfigError(f"-c {key} {value}: expected a DICOMweb URL, http(s)://<host>/dicom-web")
    return value.rstrip("/")


def _positive_int(conf: Mapping[str, str], key: str, default: int) -> int:
    value = conf.get(key, default)
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number <= 0:
        raise ConfigError(f"-c {key} {value}: expected a whole number > 0")
    return number


def _label_file(path: Path) -> dict[str, int]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the label map ({exc})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the label map must map names to values, e.g. `liver: 1`")
    return parse_label_map(data)


def resolve_labels(option: str | None, studies: Path, settings: Mapping) -> tuple[dict[str, int], str]:
    """-> (name -> value, where it came from)."""
    if option:
        if os.path.isfile(option):
            return _label_file(Path(option)), option
        return parse_label_map(option), "-c labels"
    in_datastore = studies / DATASTORE_LABELS_FILE
    if in_datastore.is_file():
        return _label_file(in_datastore), str(in_datastore)
    if settings.get("labels"):
        return parse_label_map(settings["labels"]), f"preset {settings.get('name')!r}"
    return {}, "none configured: any integer label values are accepted"


def _positive_seconds(value, key: str = "storage_retry_seconds") -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"-c {key} {value}: expected a number of seconds > 0")
    return seconds


def search_filter(conf: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> tuple[dict, str]:
    """The DICOMweb search filter (QIDO-RS attributes every image series must match) and where it came
    from: ``-c dicomweb_search_filter '{"Modality": "MR"}'``, else the environment variable when set,
    else every series."""
    for text, source in ((conf.get("dicomweb_search_filter"), "-c dicomweb_search_filter"), (environ.get(SEARCH_FILTER_ENV), SEARCH_FILTER_ENV)):
        if text is None or not str(text).strip():
            continue
        try:
            value = json.loads(text) if isinstance(text, str) else text
        except ValueError as exc:
            raise ConfigError(f"{source} {text!r}: not JSON ({exc}); e.g. '{{\"Modality\": \"MR\"}}'") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{source} {text!r}: expected a JSON object of DICOM attributes, e.g. '{{\"Modality\": \"MR\"}}'")
        if source == SEARCH_FILTER_ENV and value == MONAI_LABEL_DEFAULT_FILTER:
            continue
        return value, source
    return dict(DEFAULT_SEARCH_FILTER), "default: every modality"


@dataclass
class AppConfig:
    studies: Path  # a local folder: the datastore, or a DICOMweb datastore's cache
    preset: str = DEFAULT_PRESET
    models_dir: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    labels_source: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    warm_embeddings: bool = True
    session_max_unpacked_mb: int = DEFAULT_SESSION_MAX_UNPACKED_MB
    session_max_files: int = DEFAULT_SESSION_MAX_FILES
    max_volume_mb: int = DEFAULT_MAX_VOLUME_MB
    settings: dict = field(default_factory=dict)
    storage_retry_seconds: float = DEFAULT_STORAGE_RETRY_SECONDS
    pacs_poll_seconds: float = DEFAULT_PACS_POLL_SECONDS
    search_filter: dict = field(default_factory=dict)
    search_filter_source: str = ""
    ohif_dicomweb: str = ""  # a folder datastore: the DICOMweb server OHIF reads its studies from


    @classmethod
    def from_conf(cls, conf: Mapping[str, str], studies: str | os.PathLike) -> "AppConfig":
        studies = Path(studies)
        preset = conf.get("preset") or DEFAULT_PRESET
        overrides: dict[str, Any] = {}
        if conf.get("device"):
            overrides["device"] = conf["device"]
        base = load_preset(preset)
        for key, value in conf.items():
            if key in APP_KEYS + SESSION_KEYS + UPLOAD_KEYS or key in MONAI_KEYS:
                continue
            if "." in key or key in base:
                overrides[key] = parse_value(value) if isinstance(value, str) else value
            else:
                logger.warning("-c %s: not an app option (%s) nor a setting of preset %r; ignored", key,
                               ", ".join(APP_KEYS + SESSION_KEYS + UPLOAD_KEYS), preset)
        settings = load_preset(preset, overrides)
        labels, source = resolve_labels(conf.get("labels"), studies, settings)
        warm = str(conf.get("warm_embeddings", "true")).strip().lower() not in ("0", "false", "no", "off")
        dicom_filter, filter_source = search_filter(conf)
        return cls(
            pacs_poll_seconds=_positive_seconds(conf.get("pacs_poll_seconds", DEFAULT_PACS_POLL_SECONDS), "pacs_poll_seconds"),
            search_filter=dicom_filter, search_filter_source=filter_source, ohif_dicomweb=_http_url(conf, "ohif_dicomweb"),
            studies=studies, preset=preset, models_dir=conf.get("models_dir") or None, labels=labels,
            labels_source=source, overrides=overrides, warm_embeddings=warm, settings=settings,
            session_max_unpacked_mb=_positive_int(conf, "session_max_unpacked_mb", DEFAULT_SESSION_MAX_UNPACKED_MB),
            session_max_files=_positive_int(conf, "session_max_files", DEFAULT_SESSION_MAX_FILES),
            max_volume_mb=_positive_int(conf, "max_volume_mb", DEFAULT_MAX_VOLUME_MB),
            storage_retry_seconds=_positive_seconds(conf.get("storage_retry_seconds", DEFAULT_STORAGE_RETRY_SECONDS)),
        )

    def request_limits(self) -> dict[str, int]:
        """Request body caps in bytes: ``session`` (PUT /session/), ``upload`` (any other multipart
        body: an image, a label), ``json`` (everything else)."""
        return {
            "session": (self.session_max_unpacked_mb + BODY_HEADROOM_MB) << 20,
            "upload": (self.max_volume_mb + BODY_HEADROOM_MB) << 20,
            "json": JSON_BODY_LIMIT,
        }

    @property
    def state_dir(self) -> Path:
        return self.studies / STATE_DIR

    @property
    def bank_dir(self) -> Path:
        return bank_dir_for(self.studies, self.preset)

    @property
    def scratch_dir(self) -> Path:
        """Label snapshots being ingested (one server per datastore and preset, like the bank)."""
        return self.state_dir / f"ingest-{self.preset}"

    @property
    def embeddings_dir(self) -> Path:
        return self.state_dir / "embeddings"

    @property
    def predictions_dir(self) -> Path:
        """The latest prediction served for each image, kept to be reviewed against its final label (fewshot.review)."""
        return self.state_dir / "predictions"

    @property
    def reviews_path(self) -> Path:
        """Each reviewed prediction against the final label saved after it (fewshot.review)."""
        return self.state_dir / "reviews.json"
