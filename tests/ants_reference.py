"""antsJointFusion as the reference for tests/test_joint_fusion.py, run in a process of its own.

With more than one ITK thread antsJointFusion's posteriors vary from run to run on the same inputs
(measured up to 0.017 on the tests' synthetic volumes; with one thread they repeat exactly). ANTs reads its
thread count once, when it loads, and in the test process another test may already have loaded it with
more: so the reference runs in a spawned process whose ANTs loads with one thread.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np


def _one_itk_thread() -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    importlib.import_module("ants")  # loads here, reading the variable


def _fuse(query, images, labels, region, spacing, patch, search, correlation, beta) -> dict[int, np.ndarray]:
    import ants

    def image(a):
        return ants.from_numpy(np.ascontiguousarray(a, np.float32), spacing=tuple(spacing))

    with tempfile.TemporaryDirectory() as tmp:
        out = ants.joint_label_fusion(image(query), image(region.astype(np.float32)), [image(a) for a in images],
                                      beta=beta, rad=list(patch), label_list=[image(a) for a in labels], rho=0.01,
                                      r_search="x".join(str(r) for r in search), output_prefix=f"{tmp}/j",
                                      usecor=correlation)
        return {int(n): p.numpy()[region] for n, p in zip(out["segmentation_numbers"], out["probabilityimages"])}


class Reference:
    """One single-threaded ANTs process, reused by every call (spawning one and loading ANTs takes seconds)."""

    def __init__(self):
        self.pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_one_itk_thread)

    def fuse(self, query, images, labels, region, spacing, patch, search, correlation=False, beta=2.0):
        return self.pool.submit(_fuse, query, images, labels, region, spacing, patch, search, correlation,
                                beta).result()

    def close(self) -> None:
        self.pool.shutdown()
