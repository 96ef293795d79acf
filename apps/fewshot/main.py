"""MONAI Label app: few-shot segmentation from a support bank that grows with every saved label.

    monailabel start_server --app apps/fewshot --studies <datastore> [-c preset foundation] \
        [-c models_dir DIR] [-c device cpu|cuda] [-c labels liver=1,spleen=2] [-c retrieval.top_k 8 ...]

``<datastore>`` is a folder, or a DICOMweb URL (``http://pacs/dicom-web``, as OHIF's panel needs):
``lib/dicomweb_datastore.py`` caches its series locally and keeps the bank beside that cache; ``lib/pacs_sync.py``
keeps its final labels in step with the PACS's SEG series.

Tasks: infer ``fewshot`` (``fewshot_sam2``, its name before, is an alias); strategies ``bank_coverage``, ``random``, ``first``. The engine is the
``fewshot`` package (``lib/fewshot`` at the project's root); this app only adapts it to MONAI Label:
``lib/datastore.py`` validates uploads and reports final-label changes, ``lib/ingest.py`` keeps the
bank in step in a background thread, ``lib/infers`` and ``lib/activelearning`` wrap the engine,
``lib/routes.py`` and ``lib/sessions.py`` check what MONAI Label's stock endpoints accept blindly.

MONAI Label runs ``/batch/infer`` (and ``/train``, ``/scoring``) in a second process that builds a
second copy of this app on the same datastore. That copy opens the bank read-only and starts no
ingestion: the live server alone writes the bank.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict

if importlib.util.find_spec("fewshot") is None:  # not installed with `pip install -e .`: a fresh clone
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lib"))

import psutil
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from fewshot.config import ConfigError
from fewshot import bank_holders
from fewshot.folders import labelled, scan_datastore
from fewshot.transfer import workers
from lib.activelearning.bank_coverage import BankCoverage
from lib import annotations
from lib.app_config import AppConfig
from lib.datastore import FewshotDatastore
from lib.dicomweb_datastore import FewshotDicomWebDatastore
from lib.pacs_client import cache_root, is_dicomweb, make_client
from lib.pacs_sync import PacsSync
from lib.embedding_cache import EmbeddingCache
from lib.engine_host import EngineHost, StartupError
from lib.infers.fewshot_infer import ALIASES, TASK, FewshotInfer
from lib.ingest import IngestionWorker
from lib.progress import PROGRESS_KEY, ProgressBoard
from lib.reviews import IMAGE_KEY, Reviews
from lib.sessions import SafeSessions
from lib.validation import UploadValidator, check_id

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
# MONAI Label's main makes a missing --studies folder after its imports, well after the process starts.
STUDIES_MADE_AFTER_START = 0.2
FINAL = DefaultLabelTag.FINAL.value


def background_task_process() -> bool:
    """True in the process MONAI Label starts for /batch/infer, /train and /scoring:
    ``python -m monailabel.interfaces.utils.app`` (monailabel/utils/async_tasks/utils.py), whose
    ``run_main`` builds this app again while the live server keeps running."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monailabel.interfaces.utils.app"


def stop_workers_on_signals() -> None:
    """SIGTERM/SIGINT stop the registration worker processes at once. uvicorn catches both, shuts
    down gracefully, then re-raises the signal with the default handler: the process dies without
    running exit handlers, and the workers (and multiprocessing's helper) used to stay behind. The
    handler uvicorn installed is kept and called after. Main thread only (Python's rule for signals)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if getattr(previous, "_fewshot_stops_workers", False):
            continue  # POST /reload: already in place

        def handler(signum, frame, previous=previous):
            stopped = workers.terminate_all()
            if stopped:
                print(f"few-shot app: stopped {stopped} registration worker process(es) on {signal.Signals(signum).name}",
                      file=sys.stderr, flush=True)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        handler._fewshot_stops_workers = True
        signal.signal(sig, handler)


def _process_start() -> float:
    """When this process started (wall clock), to 10 ms on Linux: psutil's create_time adds the boot
    time, which /proc/stat gives to the second, so it can be up to a second early."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return psutil.Process().create_time() + 1.0


def _to_log_files(level: int, message: str) -> None:
    """A record for the log files only (MONAI Label's app.log), not the console."""
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    seen = set()
    current = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.FileHandler) and id(handler) not in seen:
                seen.add(id(handler))
                handler.handle(record)
        current = current.parent if current.propagate else None


class FewshotApp(MONAILabelApp):
    _live: "FewshotApp | None" = None  # the app whose worker owns the bank in this process

    def __init__(self, app_dir, studies, conf):
        self.read_only = background_task_process()
        self._rebuild_lock = threading.Lock()
        self._bank_rebuild: str | None = None  # why the bank is being rebuilt (another process replaced it)
        self._uploads: set[str] = set()
        self._uploads_lock = threading.Lock()
        self.dicomweb_client = None
        self.pacs_sync: PacsSync | None = None  # started with a live DICOMweb datastore
        self.progress = ProgressBoard()  # GET /fewshot/progress/{id}
        root = studies  # the local folder holding the bank: the datastore, or the DICOMweb cache
        if is_dicomweb(studies):
            studies = str(studies).rstrip("/").strip()
            if not settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI:
                self._fail("the few-shot app reads DICOMweb series as NIfTI; unset MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false")
            self.dicomweb_client = make_client(studies)
            root = cache_root(self.dicomweb_client)
        elif not self.read_only:
            self._check_studies_folder(Path(studies))
        try:
            self.app_config = AppConfig.from_conf(conf or {}, root)
            self.host = EngineHost.open(self.app_config, read_only=self.read_only)
        except (StartupError, ConfigError) as exc:
            self._fail(str(exc))
        # Predictions served, each reviewed against the final label saved after it (lib/reviews.py).
        self.reviews = None if self.read_only else Reviews(
            self.app_config.predictions_dir, self.app_config.reviews_path, self.host.bank_ids, self.host.config.preset)
        self.worker = None if self.read_only else IngestionWorker(
            self.host, sources=self._final_labels, scratch_dir=self.app_config.scratch_dir,
            storage_retry_seconds=self.app_config.storage_retry_seconds, annotation_of=self._annotation_of,
            after_ingest=self.reviews.label_ingested,
        )
        self.cache = EmbeddingCache(self.app_config.embeddings_dir, self.host.embedding_key(), self.host.embed_volume)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Few-shot segmentation",
            description=self.host.describe(),
            version=VERSION,
        )
        if self.read_only:
            logger.info("few-shot app in a MONAI Label background task: bank read-only, no ingestion")
            return
        if self.dicomweb_client is None and not self.datastore().list_images():
            logger.warning(
                "\n%s\nTHE DATASTORE %s HOLDS NO IMAGES: nothing to label or segment. Put volumes (.nii.gz, .nii, .nrrd) "
                "in it, and final labels in %s, or check --studies.\n%s", "!" * 100, studies,
                os.path.join(studies, "labels", "final"), "!" * 100,
            )
        if FewshotApp._live is not None and FewshotApp._live.worker is not None:
            FewshotApp._live.worker.stop()  # POST /reload built a new app: one writer per bank
        FewshotApp._live = self
        if self.app_config.warm_embeddings and "bank_coverage" in self._strategies:
            strategy: BankCoverage = self._strategies["bank_coverage"]
            self.worker.add_idle_task(lambda: strategy.warm_step(self.datastore()))
        self.worker.add_idle_task(self.host.prepare_bank)
        self.worker.resync("start-up")
        self.worker.start()
        # Its own thread, not an idle task: waiting on busy workers must not hold up a saved label.
        threading.Thread(target=self.host.warm, name="fewshot-warm", daemon=True).start()
        if isinstance(self._datastore, FewshotDicomWebDatastore):
            # The PACS is the truth for final labels; the worker hears of each change the sync brings.
            # After the start-up sync, the PACS is polled: SEGs stored by any tool are picked up.
            self.pacs_sync = PacsSync(self._datastore)
            sync = lambda: self.pacs_sync.run(  # noqa: E731
                keep_going=lambda: FewshotApp._live is self, poll_seconds=self.app_config.pacs_poll_seconds)
            threading.Thread(target=sync, name="fewshot-pacs-sync", daemon=True).start()
        if "monailabel.app" in sys.modules:
            from monailabel.app import app as fastapi_app

            from lib import routes

            routes.install(fastapi_app, self.app_config.request_limits())
            stop_workers_on_signals()

    @classmethod
    def _check_studies_folder(cls, studies: Path) -> None:
        """MONAI Label creates a --studies folder that does not exist, empty, just before it builds
        the app: a mistyped path served an empty datastore without a word. Refused, and the folder
        it made removed; a new, empty datastore is a folder made beforehand."""
        try:
            empty = not any(studies.iterdir())
            made_now = studies.stat().st_ctime >= _process_start() + STUDIES_MADE_AFTER_START
        except OSError:
            return
        if empty and made_now:
            try:
                studies.rmdir()
            except OSError:
                pass
            cls._fail(f"--studies {studies} does not exist (MONAI Label had just created it, empty). Check the path; "
                      f"to start on a new, empty datastore, create the folder first: mkdir -p {studies}")

    @staticmethod
    def _fail(message: str):
        if "monailabel.app" in sys.modules:
            # Inside the server's start-up: any exception would surface as a 100-line traceback
            # through uvicorn and Starlette's lifespan. Stop with the one line a user can act on,
            # shown once (the console log handler would repeat it) and kept in the log file.
            _to_log_files(logging.ERROR, f"few-shot app cannot start: {message}")
            print(f"\nERROR: few-shot app cannot start: {message}\n", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(2)
        logger.error("few-shot app cannot start: %s", message)
        raise StartupError(message)

    # ------------------------------------------------------------------ MONAI Label hooks

    def init_datastore(self) -> Datastore:
        logger.info("Init Datastore for: %s", self.studies)
        validator = UploadValidator(self.host.allowed_values, self.host.label_map,
                                    max_volume_bytes=self.app_config.max_volume_mb << 20)
        self.upload_validator = validator
        if self.dicomweb_client is not None:
            # Not MONAI Label's init_remote_datastore: it downloads dcmqi from GitHub at start-up.
            return FewshotDicomWebDatastore(
                self.dicomweb_client,
                search_filter=self.app_config.search_filter,  # every modality unless narrowed (lib/app_config.py)
                cache_path=self.app_config.studies,
                validator=validator,
                listener=self,
                fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                live=not self.read_only,
            )
        return FewshotDatastore(
            self.studies,
            validator=validator,
            listener=self,
            clean_tmp=not self.read_only,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = FewshotInfer(self.host, self.bank_status, self.progress, self.reviews)
        # One task under its name and its old ones: every route (/infer, /batch/infer) takes either.
        return {TASK: task, **{alias: task for alias in ALIASES}}

    def info(self):
        """MONAI Label's /info, with the preset the server runs, and the task listed once: a client
        showing the models (Slicer, OHIF) offers one task, and learns its other names from model_aliases."""
        meta = super().info()
        for alias in ALIASES:
            meta["models"].pop(alias, None)
        meta["model_aliases"] = {alias: TASK for alias in ALIASES}
        meta["preset"] = self.host.config.preset
        return meta

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"bank_coverage": BankCoverage(self.host, self.cache), "random": Random(), "first": First()}

    def init_batch_infer(self):
        # -c ray_address: /batch/infer is handed to the engine's Ray batch runner (lib/ray_batch.py)
        from lib.ray_batch import batch_infer_task

        return batch_infer_task(self)

    def _load_sessions(self, load=False):
        if not load:
            return None
        return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def check_infer_request(self, model: str, request: dict) -> None:
        """Cheap checks on an /infer or /batch/infer request, before any work is done."""
        if model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; this app serves {sorted(self._infers)}")
        if request.get("save_label") and request.get("label_tag", DefaultLabelTag.ORIGINAL) == FINAL:
            # Final labels are what a radiologist reviewed: they become the bank's support examples.
            raise HTTPException(
                400, "an automatic result cannot be saved as the 'final' label; save it as 'original' "
                "(the default), review it, then submit it as the final label",
            )
        if request.get("request_id") is not None:
            check_id(request["request_id"], "request_id")
        task = self._infers[model]
        if isinstance(task, FewshotInfer):
            task.options(request)
            task.result_format(request)
            task.requested_labels(request)

    def infer(self, request, datastore=None):
        self.check_infer_request(request.get("model"), request)
        image = request.get("image")
        if isinstance(image, str):
            self.check_infer_image(image, datastore)
        rebuilding = self.bank_replaced()
        if rebuilding:
            raise HTTPException(503, f"the support bank was replaced on disk by another process ({rebuilding}); it is being "
                                     "rebuilt from the datastore's final labels: try again in a moment (/info shows the progress)")
        # The datastore image inferred, for the review of its prediction; always set here, so a client cannot name one.
        request = dict(request, **{IMAGE_KEY: image if isinstance(image, str) and not os.path.isabs(image) else None})
        tracker = self._track(request)
        if tracker is None:
            return super().infer(request, datastore)
        try:
            result = super().infer(dict(request, **{PROGRESS_KEY: tracker.token}), datastore)
        except BaseException as exc:
            tracker.fail(str(getattr(exc, "detail", "") or exc) or type(exc).__name__)
            raise
        tracker.finish()
        return result

    def _track(self, request: dict):
        """The inference's entry in GET /fewshot/progress: under the client's ``request_id``, else the
        image id (an uploaded or session image has none a client knows: no entry without request_id)."""
        key, image = request.get("request_id"), request.get("image")
        if key is not None:
            key = check_id(key, "request_id")
        elif isinstance(image, str) and not os.path.isabs(image):
            key = image
        if key is None:
            return None
        shown = image if isinstance(image, str) and not os.path.isabs(image) else "upload"
        return self.progress.start(key, shown, str(request.get("model")))

    def bank_replaced(self) -> str | None:
        """Why the bank is being rebuilt, while it is. When another process replaced the bank this
        server uses (built with other settings) or removed it, the bank is rebuilt from the final
        labels in the background, and inferences wait for it rather than run on an empty bank. If
        that process still uses the bank, it is left to it and this server says so."""
        if self.worker is None:
            return None
        reason = self.host.bank_replaced()
        with self._rebuild_lock:
            if reason and self._bank_rebuild is None:
                if bank_holders.used_elsewhere(self.app_config.bank_dir):
                    return f"{reason}, and that process still uses it: stop it, and this server rebuilds its bank"
                logger.warning("support bank %s: %s; rebuilding it from the final labels", self.app_config.bank_dir, reason)
                bank_holders.ensure_held(self.app_config.bank_dir)
                self._bank_rebuild = reason
                self.worker.resync(f"support bank replaced on disk: {reason}")
            if self._bank_rebuild is not None and not self.worker.busy():
                logger.info("support bank %s rebuilt after: %s", self.app_config.bank_dir, self._bank_rebuild)
                self._bank_rebuild = None
            return self._bank_rebuild

    def check_upload(self, path: str, what: str) -> None:
        """An image sent for one inference (an /infer upload, a session's volume file), from its
        header before it is read: 413 over the budget (-c max_volume_mb), 415/422 when unusable."""
        self.upload_validator.check_volume(path, what)

    def register_upload(self, path: str) -> None:
        with self._uploads_lock:
            self._uploads.add(os.path.realpath(path))

    def forget_upload(self, path: str) -> None:
        with self._uploads_lock:
            self._uploads.discard(os.path.realpath(path))

    def check_infer_image(self, image: str, datastore: Datastore | None = None) -> None:
        """An image is a datastore id, an upload this server stored for the request, or a session's
        image. MONAI Label would otherwise read any path on the server a client names."""
        datastore = datastore or self.datastore()
        if not os.path.isabs(image):
            check_id(image)
            if not datastore.get_image_uri(image):
                raise HTTPException(404, f"unknown image id {image!r}: the datastore has no such image")
            return
        real = os.path.realpath(image)
        with self._uploads_lock:
            if real in self._uploads:
                return
        sessions = self.sessions()
        store = os.path.realpath(sessions.store_path) if sessions is not None and sessions.store_path else None
        if store and real.startswith(store + os.sep) and os.path.exists(real):
            return
        raise HTTPException(400, f"invalid image id {image!r}: pass a datastore id, upload the image, or use a session")

    def on_save_label(self, image_id, label_id):
        return {"support_bank": self.bank_status()}

    # ------------------------------------------------------------------ the bank and the datastore

    def _final_labels(self) -> dict[str, tuple[str, str]]:
        """image id -> (image, final label), from the files on disk: the datastore (the source of
        truth), or the DICOMweb cache, which the PACS sync and saves keep in step with the PACS."""
        return labelled(scan_datastore(self.app_config.studies))

    def _annotation_of(self, image_id: str):
        """The annotated part of an image's final label, as its save recorded it in the index."""
        datastore = getattr(self, "_datastore", None)
        info = datastore.get_label_info(image_id, FINAL) if datastore is not None else {}
        return annotations.of(info)

    # The live server's worker is told; a background task's copy leaves the bank to it (the server
    # notices datastore changes itself).

    def final_label_saved(self, image_id: str, reason: str) -> None:
        if self.worker is not None:
            self.worker.ingest(image_id, reason)

    def final_label_removed(self, image_id: str) -> None:
        if self.worker is not None:
            self.worker.remove(image_id)

    def datastore_changed(self, delay: float = 0.0) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.resync("datastore changed on disk", delay)

    def bank_status(self) -> dict:
        rebuilding = self.bank_replaced() if getattr(self, "_rebuild_lock", None) else None
        status = self.host.stats()
        if rebuilding:
            status["rebuilding"] = rebuilding
        status["ingestion"] = self.worker.status() if self.worker is not None else {"state": "read-only"}
        datastore = getattr(self, "_datastore", None)  # bank_status is called while the app is built
        if isinstance(datastore, FewshotDicomWebDatastore):
            sync = getattr(self, "pacs_sync", None)  # none in a background task's read-only process
            status["pacs"] = sync.status() if sync is not None else {"state": "not started"}
        elif isinstance(datastore, FewshotDatastore):
            status["watcher"] = datastore.watcher_status()
        return status
