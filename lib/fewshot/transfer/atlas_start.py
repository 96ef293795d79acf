"""What ``AtlasTransfer.warm`` runs ahead of a first segmentation: the imports of a registration worker, and
one tiny joint fusion to load its compiled loops."""
from __future__ import annotations

import numpy as np

from fewshot.transfer.fusion import FusionSettings, fuse


def warm_worker(deformable: str) -> int:
    """A worker's imports before its first job (``AtlasTransfer.warm``): ANTs for every affine, convexAdam
    and torch for the MIND stage (about 1.3 s each). -> the process id."""
    import os

    import ants  # noqa: F401 - loaded after _init_worker set its thread count, as a job would load it

    if deformable == "mind":
        from fewshot.transfer.mind import _convex_adam

        _convex_adam()
    return os.getpid()


def warm_fusion(settings: FusionSettings) -> None:
    """Joint fusion once on a tiny made-up scan (three slices, two votes that disagree), through the same
    calls and array types as a real one, so that its compiled loops are loaded (or compiled, once per
    installation: about 5 s) before the first real fusion needs them."""
    rng = np.random.default_rng(0)
    shape = (3, 24, 24)
    query = rng.random(shape, dtype=np.float32)
    images = np.stack([query + 0.1 * rng.random(shape, dtype=np.float32) for _ in range(2)])
    probabilities = np.zeros((2, 1) + shape, np.float32)
    probabilities[0, 0, :, 4:14, 4:14] = 1.0
    probabilities[1, 0, :, 7:17, 7:17] = 1.0
    fuse(query, images, probabilities, (1.0, 1.0, 1.0), settings)
