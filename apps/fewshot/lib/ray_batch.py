"""``/batch/infer`` on Ray: with ``-c ray_address ADDRESS`` MONAI Label's batch inference hands its
images to the engine's batch runner (``fewshot.batch``) instead of segmenting them one by one in its
background process.

``-c ray_address local`` starts a Ray on this machine for each batch; any other value is an existing
cluster's address (``auto``, ``ray://head:10001``). ``-c ray_workers N``, ``-c ray_cpus_per_worker``
and ``-c ray_gpus_per_worker`` size the pool (default: the cluster's CPUs, one per worker, no GPU);
``-c ray_case_timeout SECONDS`` fails a case that runs longer and replaces its worker.

What stays MONAI Label's: which images (``images``: all, labeled, unlabeled or a list;
``max_batch_size``), ``label_tag`` (``original``; never ``final``), and the request's ``top_k``,
``memories``, ``matching``. Images come from the datastore (a DICOMweb datastore downloads each
series into its cache here). The runner segments them against the bank pinned at the batch's start
(opened read-only, as this background process always does), with its manifest in
``<datastore>/.fewshot/batch-<preset>/``: a batch asked again skips the images it already did
against the same bank. Each segmented image is saved to the datastore under ``label_tag``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from fewshot.batch.inputs import Case
from fewshot.batch.runner import BatchSpec, RayOptions, run_batch
from fewshot.batch.worker import batch_settings

logger = logging.getLogger(__name__)

RAY_KEYS = ("ray_address", "ray_workers", "ray_cpus_per_worker", "ray_gpus_per_worker", "ray_case_timeout")
LOCAL = "local"


def ray_options(conf: dict) -> RayOptions | None:
    """The pool ``-c ray_*`` asks for, or None without ``-c ray_address`` (MONAI Label's own batch)."""
    address = str(conf.get("ray_address") or "").strip()
    if not address:
        return None

    def number(key, kind, default):
        value = conf.get(key)
        return default if value in (None, "") else kind(value)

    return RayOptions(
        address=None if address == LOCAL else address,
        workers=number("ray_workers", int, None),
        cpus_per_worker=number("ray_cpus_per_worker", float, 1.0),
        gpus_per_worker=number("ray_gpus_per_worker", float, 0.0),
        case_timeout=number("ray_case_timeout", float, None),
    )


class RayBatchInfer(BatchInferTask):
    def __init__(self, app, options: RayOptions):
        self.app = app
        self.options = options

    def __call__(self, request: Dict[str, Any], datastore: Datastore, infer: Callable) -> Dict[str, Any]:
        model = request.get("model")
        self.app.check_infer_request(model, request)  # unknown model, a 'final' tag, bad options: before any work
        image_ids = sorted(self.get_images(request, datastore))
        if request.get("max_batch_size", 0) > 0:
            image_ids = image_ids[: request["max_batch_size"]]
        label_tag = request.get("label_tag", DefaultLabelTag.ORIGINAL)
        result: Dict[str, Any] = {image_id: {} for image_id in image_ids}
        cases = []
        for image_id in image_ids:
            try:
                cases.append(Case(image_id, datastore.get_image_uri(image_id)))
            except Exception as exc:  # noqa: BLE001 - a series the PACS will not give is one failed image
                logger.warning("batch: image %r not available: %s", image_id, exc)
        report = run_batch(cases, self._spec(request), self.options, progress=False)
        logger.info("batch on Ray: %d segmented, %d skipped (done before), %d failed, bank generation %s%s",
                    report.done, report.skipped, report.failed, report.bank_generation,
                    f"; stopped: {report.error}" if report.error else "")
        from fewshot.batch.manifest import Manifest

        with Manifest(self._output_dir()) as manifest:
            records = dict(manifest.cases)
        for case in cases:
            record = records.get(case.case_id)
            if not record or record.get("status") != "done" or record.get("bank_generation") != report.bank_generation:
                continue
            path = str(manifest.output_dir / record["output"])
            info = {"model": model, "bank_generation": record["bank_generation"], "batch": "ray"}
            try:
                label_id = datastore.save_label(case.case_id, path, label_tag, info)
            except Exception as exc:  # noqa: BLE001 - one label the datastore refuses is one failed image
                logger.warning("batch: label of %r not saved: %s", case.case_id, exc)
                continue
            result[case.case_id] = {"label": label_id, "label_tag": label_tag, "bank_generation": record["bank_generation"]}
        return result

    def _output_dir(self):
        config = self.app.app_config
        return config.state_dir / f"batch-{config.preset}"

    def _spec(self, request: Dict[str, Any]) -> BatchSpec:
        config, host = self.app.app_config, self.app.host
        options, _ = self.app._infers[request["model"]].options(request)
        overrides: dict[str, Any] = {"retrieval.top_k": options.top_k, "selection.keep": options.memories}
        if not options.matching:
            overrides["matcher.type"] = "none"
        threads = max(1, int(self.options.cpus_per_worker))
        return BatchSpec(
            settings=batch_settings(config.settings, threads, overrides),
            bank_dir=str(config.bank_dir), output_dir=str(self._output_dir()), models_dir=config.models_dir,
            label_names=host.label_map(),
        )


def batch_infer_task(app) -> Callable:
    """What ``MONAILabelApp.init_batch_infer`` returns: the Ray runner's adapter when configured."""
    options = ray_options(app.conf)
    return RayBatchInfer(app, options) if options is not None else BatchInferTask()
