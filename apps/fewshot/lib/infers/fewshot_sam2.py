"""The ``fewshot_sam2`` infer task: the engine's segmentation behind MONAI Label's infer API.

The task holds no segmentation logic: it turns a request into engine options, calls
``EngineHost.segment`` and packs the label file plus a JSON of labels, skipped labels (with the
reason), per-label provenance (the support slices used for every query slice) and latencies.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Dict

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.engine_host import EngineHost, InferOptions

logger = logging.getLogger(__name__)

TOP_K_RANGE = (1, 512)
MEMORIES_RANGE = (1, 32)
# Engine timing keys that are pre-processing / post-processing in MONAI Label's latency terms.
PRE_STAGES = ("prepare_and_embed",)
POST_STAGES = ("postprocess",)
NOT_SECONDS = ("total", "slices")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise HTTPException(400, f"{name} must be true or false, not {value!r}")


def _as_int(value: Any, name: str, bounds: tuple[int, int]) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, not {value!r}") from None
    if not bounds[0] <= number <= bounds[1]:
        raise HTTPException(400, f"{name} must lie in {bounds[0]}..{bounds[1]}, not {number}")
    return number


class FewshotSam2(InferTask):
    def __init__(self, host: EngineHost, bank_status: Callable[[], dict]):
        self.host = host
        self.bank_status = bank_status
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=None,
            dimension=3,
            description=host.describe(),
        )

    # ------------------------------------------------------------------ /info

    def config(self) -> Dict[str, Any]:
        d = self.host.defaults
        # A list is shown as a drop-down by the clients; the device is fixed at start-up (-c device).
        return {"top_k": d.top_k, "matching": d.matching, "memories": d.memories, "device": [self.host.device]}

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["labels"] = self.host.label_map()
        info["support_bank"] = self.bank_status()
        info["preset"] = self.host.config.preset
        return info

    def is_valid(self) -> bool:
        return True

    # ------------------------------------------------------------------ inference

    def options(self, request: Dict[str, Any]) -> tuple[InferOptions, list[str]]:
        notes = []
        options = self.host.defaults
        if request.get("top_k") is not None:
            options = replace(options, top_k=_as_int(request["top_k"], "top_k", TOP_K_RANGE))
        if request.get("memories") is not None:
            options = replace(options, memories=_as_int(request["memories"], "memories", MEMORIES_RANGE))
        if request.get("matching") is not None:
            matching = _as_bool(request["matching"], "matching")
            if matching and self.host.engine.matcher is None:
                notes.append(f"matching is not available in preset {self.host.config.preset!r}; ran without it")
                matching = False
            options = replace(options, matching=matching)
        device = request.get("device")
        if isinstance(device, list):
            device = device[0] if device else None
        if device and str(device) != self.host.device:
            notes.append(f"device is fixed at start-up (-c device); ran on {self.host.device}, not {device}")
        return options, notes

    @staticmethod
    def requested_labels(request: Dict[str, Any]) -> list[str] | None:
        labels = request.get("labels")
        if not labels:
            return None
        if isinstance(labels, str):
            return [s.strip() for s in labels.split(",") if s.strip()]
        if isinstance(labels, dict):
            return [str(k) for k in labels]
        return [str(v) for v in labels]

    def __call__(self, request: Dict[str, Any]):
        start = time.perf_counter()
        options, notes = self.options(request)
        try:
            seg = self.host.segment(request["image"], self.requested_labels(request), options)
        except ValueError as exc:  # unknown label names, unreadable image (VolumeError)
            raise HTTPException(422, str(exc)) from None
        t_write = time.perf_counter()
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix="fewshot-", delete=False).name
        seg.save(out, sidecar=False)
        write = time.perf_counter() - t_write
        summary = seg.summary()
        timings = summary["timings"]
        seconds = {k: v for k, v in timings.items() if k not in NOT_SECONDS}
        pre = sum(seconds.get(k, 0.0) for k in PRE_STAGES)
        post = sum(seconds.get(k, 0.0) for k in POST_STAGES)
        infer = sum(v for k, v in seconds.items() if k not in PRE_STAGES + POST_STAGES)
        total = time.perf_counter() - start
        messages = [f"{name}: skipped, {why}" for name, why in seg.skipped.items()] + notes
        if not seg.labels:
            messages.insert(0, "nothing segmented: save a final label of these structures first, it joins the support bank")
        result = {
            "label_names": self.host.label_map(),
            "segmented": summary["labels"],
            "voxels": summary["voxels"],
            "skipped": summary["skipped"],
            "message": "; ".join(messages),
            "options": asdict(options),
            "preset": self.host.config.preset,
            "provenance": summary["provenance"],
            "timings": timings,
            "latencies": {
                "pre": round(pre, 3), "infer": round(infer, 3), "invert": 0.0, "post": round(post, 3),
                "write": round(write, 3), "total": round(total, 3), "transform": None,
            },
        }
        logger.info(
            "fewshot_sam2: %s -> %s%s in %.2f s", request["image"], summary["labels"] or "nothing",
            f" ({result['message']})" if result["message"] else "", total,
        )
        return out, result
