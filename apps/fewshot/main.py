"""MONAI Label app: few-shot segmentation from a support bank that grows with every saved label.

    monailabel start_server --app apps/fewshot --studies <datastore> [-c preset foundation] \
        [-c models_dir DIR] [-c device cpu|cuda] [-c labels liver=1,spleen=2] [-c retrieval.top_k 8 ...]

Tasks: infer ``fewshot_sam2``; strategies ``bank_coverage``, ``random``, ``first``. The engine is the
``fewshot`` package (``lib/fewshot`` at the project's root); this app only adapts it to MONAI Label:
``lib/datastore.py`` validates uploads and reports final-label changes, ``lib/ingest.py`` keeps the
bank in step in a background thread, ``lib/infers`` and ``lib/activelearning`` wrap the engine.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict

try:
    import fewshot  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # a fresh clone: use the engine beside the app
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lib"))

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from fewshot.config import ConfigError
from fewshot.datastore import labelled, scan_datastore
from lib.activelearning.bank_coverage import BankCoverage
from lib.app_config import AppConfig
from lib.datastore import FewshotDatastore
from lib.embedding_cache import EmbeddingCache
from lib.engine_host import EngineHost, StartupError
from lib.infers.fewshot_sam2 import FewshotSam2
from lib.ingest import IngestionWorker
from lib.validation import UploadValidator, check_id

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


class FewshotApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        if str(studies).startswith(("http://", "https://")):
            self._fail(f"the few-shot app needs a local datastore folder for its support bank, not {studies}")
        try:
            self.app_config = AppConfig.from_conf(conf or {}, studies)
            self.host = EngineHost.open(self.app_config)
        except (StartupError, ConfigError) as exc:
            self._fail(str(exc))
        self.worker = IngestionWorker(self.host, sources=self._final_labels, scratch_dir=self.app_config.scratch_dir)
        self.cache = EmbeddingCache(self.app_config.embeddings_dir, self.host.embedding_key(), self.host.embed_volume)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Few-shot segmentation",
            description=self.host.describe(),
            version=VERSION,
        )
        if self.app_config.warm_embeddings and "bank_coverage" in self._strategies:
            strategy: BankCoverage = self._strategies["bank_coverage"]
            self.worker.add_idle_task(lambda: strategy.warm_step(self.datastore()))
        self.worker.resync("start-up")
        self.worker.start()

    @staticmethod
    def _fail(message: str):
        logger.error("few-shot app cannot start: %s", message)
        if "monailabel.app" in sys.modules:
            # Inside the server's start-up: any exception would surface as a 100-line traceback
            # through uvicorn and Starlette's lifespan. Stop with the one line a user can act on.
            print(f"\nERROR: few-shot app cannot start: {message}\n", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(2)
        raise StartupError(message)

    # ------------------------------------------------------------------ MONAI Label hooks

    def init_datastore(self) -> Datastore:
        logger.info("Init Datastore for: %s", self.studies)
        return FewshotDatastore(
            self.studies,
            validator=UploadValidator(self.host.allowed_values),
            listener=self,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {"fewshot_sam2": FewshotSam2(self.host, self.bank_status)}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"bank_coverage": BankCoverage(self.host, self.cache), "random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        image = request.get("image")
        if isinstance(image, str):
            self._check_infer_image(image, datastore or self.datastore())
        return super().infer(request, datastore)

    def _check_infer_image(self, image: str, datastore: Datastore) -> None:
        """An image is a datastore id, or a file the server itself wrote (an upload, a session).

        MONAI Label would otherwise read any path on the server a client names."""
        if datastore.get_image_uri(image) and not os.path.isabs(image):
            return
        real = os.path.realpath(image)
        own_dirs = {os.path.realpath(tempfile.gettempdir())}
        sessions = self.sessions()
        if sessions is not None and getattr(sessions, "store_path", None):
            own_dirs.add(os.path.realpath(sessions.store_path))
        if os.path.isabs(image) and os.path.exists(real) and any(real.startswith(d + os.sep) for d in own_dirs):
            return
        check_id(image)
        raise HTTPException(404, f"unknown image id {image!r}: the datastore has no such image")

    def on_save_label(self, image_id, label_id):
        return {"support_bank": self.bank_status()}

    # ------------------------------------------------------------------ the bank and the datastore

    def _final_labels(self) -> dict[str, tuple[str, str]]:
        """image id -> (image, final label), from the files on disk (the source of truth)."""
        return labelled(scan_datastore(self.studies))

    def final_label_saved(self, image_id: str, reason: str) -> None:
        self.worker.ingest(image_id, reason)

    def final_label_removed(self, image_id: str) -> None:
        self.worker.remove(image_id)

    def datastore_changed(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.resync("datastore changed on disk")

    def bank_status(self) -> dict:
        status = self.host.stats()
        status["ingestion"] = self.worker.status()
        return status
