"""Weights-free label transfer: multi-atlas segmentation by 2D registration and local label fusion.

For each query slice, each chosen support (an "atlas": image + label map) is registered to it
with SimpleITK in two stages, both multi-resolution and cheap at canvas size:

1. affine (or similarity), initialised by matching image moments, optimising normalised
   correlation (robust to the contrast left between patients by intensity normalisation);
2. deformable: fast symmetric-forces demons on the histogram-matched support, coarse to fine,
   giving a smooth displacement field (``deformable.method: none`` stops after stage 1).

The support's labels are warped one-hot with linear interpolation (soft votes) and fused by
locally weighted voting: at each pixel a support's vote weighs exp(-local SSD / h), the SSD
between the query and the warped support in a Gaussian window (Artaechevarria et al. 2009), so
supports that align well *here* decide *here*. Labels the plan does not allow stay exactly 0.

3D consistency, after all slices: each label's probability map is averaged with its neighbours
in z (weights ``consistency.z_weights``, renormalised over neighbours where the label is
allowed; never spreading into slices where it is not), then optionally only the largest 3D
connected component of each label (above ``consistency.threshold``) is kept.

Slices are registered in a process pool (``workers``), SimpleITK single-threaded in each worker,
so both cores work on different slices without oversubscription. The pool is started once per
transfer step, on first use, and reused by every later call (the alpnet protocol calls
``segment_volume`` per organ per query scan); ``close()`` or interpreter exit stops it.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fewshot.config import ConfigError
from fewshot.settings import typed_section
from fewshot.transfer.workers import WorkerPool, sitk_threads
from fewshot.types import Progress, SlicePlan, SliceResult, VolumeResult

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = "registration-v1"
_PROB_CLIP = 1e-4  # object scores are log-odds of probabilities clipped to [clip, 1 - clip]


@dataclass(frozen=True)
class AffineStage:
    transform: str  # "affine" or "similarity" (rotation + isotropic scale + shift)
    shrink_factors: tuple[int, ...]  # coarse to fine pyramid levels
    smoothing_sigmas: tuple[float, ...]  # Gaussian smoothing (pixels) per level
    iterations: int  # optimiser iterations per level
    learning_rate: float  # initial step of the regular-step gradient descent
    min_step: float  # the optimiser stops once its step has shrunk below this


@dataclass(frozen=True)
class LocalAffineStage:
    """A second affine whose metric sees only the support's structures and their surroundings: the
    whole-slice affine aligns the body outline, which need not put a small organ (the heart in a
    short-axis slice) where it is in the query."""
    method: str  # "affine" or "none"
    margin: int  # pixels the support's labelled region is dilated by to make the metric's mask
    shrink_factors: tuple[int, ...]
    smoothing_sigmas: tuple[float, ...]
    iterations: int
    learning_rate: float
    min_step: float


@dataclass(frozen=True)
class DeformableStage:
    method: str  # "demons" or "none"
    shrink_factors: tuple[int, ...]
    iterations: tuple[int, ...]  # demons iterations per level
    field_sigma: float  # smoothing of the displacement field (pixels at each level): its stiffness


@dataclass(frozen=True)
class FusionStage:
    window_sigma: float  # Gaussian window (pixels) of the local SSD
    h: float  # SSD scale of the weights exp(-SSD / h); intensities are in [0, 1]
    presence: str  # "weighted": a label is kept on a slice only if the supports holding it win the vote
    #                weighted by exp(-global SSD / h); "any": kept if any support holds it


@dataclass(frozen=True)
class ConsistencyStage:
    z_weights: tuple[float, ...]  # odd-length kernel over neighbouring slices, centred on the slice; [1] = off
    largest_component: bool  # keep only each label's largest 3D connected component
    threshold: float  # probability above which a pixel belongs to a component


@dataclass(frozen=True)
class RegistrationSettings:
    workers: int  # processes registering slices in parallel; 1 = in this process
    threads_per_worker: int  # SimpleITK threads inside each worker
    start_method: str  # multiprocessing start method of the pool ("spawn" is safe in threaded servers)
    log_every: int  # log progress every this many slices
    affine: AffineStage
    local_affine: LocalAffineStage
    deformable: DeformableStage
    fusion: FusionStage
    consistency: ConsistencyStage

    @classmethod
    def from_settings(cls, settings: Mapping) -> "RegistrationSettings":
        """Every key required, each of its type (the stages are sections of their own), then checked
        together; configs/presets/classic-slices.yaml sets them all."""
        out = typed_section(cls, settings, "transfer", "configs/presets/classic-slices.yaml")
        out.validate()
        return out

    def validate(self) -> None:
        a, d, c = self.affine, self.deformable, self.consistency
        problems = []
        if self.workers < 1 or self.threads_per_worker < 1:
            problems.append("workers and threads_per_worker must be >= 1")
        if a.transform not in ("affine", "similarity"):
            problems.append(f"affine.transform {a.transform!r} must be affine or similarity")
        if len(a.shrink_factors) != len(a.smoothing_sigmas) or not a.shrink_factors:
            problems.append("affine.shrink_factors and affine.smoothing_sigmas need the same, non-zero length")
        la = self.local_affine
        if la.method not in ("affine", "none"):
            problems.append(f"local_affine.method {la.method!r} must be affine or none")
        if la.method != "none" and (len(la.shrink_factors) != len(la.smoothing_sigmas) or not la.shrink_factors or la.margin < 0):
            problems.append("local_affine needs shrink_factors and smoothing_sigmas of the same, non-zero length and a margin >= 0")
        if d.method not in ("demons", "none"):
            problems.append(f"deformable.method {d.method!r} must be demons or none")
        if d.method == "demons" and (len(d.shrink_factors) != len(d.iterations) or not d.shrink_factors):
            problems.append("deformable.shrink_factors and deformable.iterations need the same, non-zero length")
        if self.fusion.h <= 0 or self.fusion.window_sigma <= 0:
            problems.append("fusion.h and fusion.window_sigma must be positive")
        if self.fusion.presence not in ("weighted", "any"):
            problems.append(f"fusion.presence {self.fusion.presence!r} must be weighted or any")
        if len(c.z_weights) % 2 != 1 or min(c.z_weights) < 0 or c.z_weights[len(c.z_weights) // 2] <= 0:
            problems.append("consistency.z_weights must have odd length, non-negative weights and a positive centre")
        if self.start_method not in multiprocessing.get_all_start_methods():
            problems.append(f"start_method {self.start_method!r} is not available here")
        if problems:
            raise ConfigError("transfer registration settings: " + "; ".join(problems))


# ---------------------------------------------------------------------------------- registration


def _image(array: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))


def _initial_transform(fixed: sitk.Image, moving: sitk.Image, kind: str) -> sitk.Transform:
    base = sitk.AffineTransform(2) if kind == "affine" else sitk.Similarity2DTransform()
    try:
        return sitk.CenteredTransformInitializer(fixed, moving, base, sitk.CenteredTransformInitializerFilter.MOMENTS)
    except RuntimeError:  # a blank image has no moments: centre the image boxes instead
        return sitk.CenteredTransformInitializer(fixed, moving, base, sitk.CenteredTransformInitializerFilter.GEOMETRY)


def register_affine(fixed: sitk.Image, moving: sitk.Image, stage: AffineStage | LocalAffineStage,
                    initial: sitk.Transform | None = None, moving_mask: sitk.Image | None = None) -> sitk.Transform:
    """fixed -> moving point mapping (SimpleITK convention), starting from the moments' alignment or
    from ``initial``; ``moving_mask`` restricts the metric to the moving image's pixels inside it."""
    if initial is None:
        initial = _initial_transform(fixed, moving, stage.transform)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=stage.learning_rate, minStep=stage.min_step, numberOfIterations=stage.iterations,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([int(s) for s in stage.shrink_factors])
    method.SetSmoothingSigmasPerLevel([float(s) for s in stage.smoothing_sigmas])
    method.SetInitialTransform(initial, inPlace=False)
    try:
        return method.Execute(fixed, moving)
    except RuntimeError as err:  # e.g. the images do not overlap at all: keep the starting guess
        logger.debug("affine registration failed (%s); using its starting transform", err)
        return initial


def register_local_affine(fixed: sitk.Image, moving: sitk.Image, mask: np.ndarray, start: sitk.Transform,
                          stage: LocalAffineStage) -> sitk.Transform:
    """The affine refined on the support's labelled region (dilated by ``stage.margin`` pixels):
    ``start`` when the support holds no label on this slice or the stage is off."""
    region = np.asarray(mask) > 0
    if stage.method == "none" or not region.any():
        return start
    if stage.margin > 0:
        region = ndimage.binary_dilation(region, structure=np.ones((3, 3), bool), iterations=int(stage.margin))
    initial = _as_affine(start)  # a similarity is an affine: the local stage may shear what the global kept rigid
    moving_mask = sitk.GetImageFromArray(region.astype(np.uint8))
    moving_mask.CopyInformation(moving)
    return register_affine(fixed, moving, stage, initial=initial, moving_mask=moving_mask)


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """A 2D affine-family transform (affine, similarity; as a registration returns it) as an AffineTransform."""
    t = transform
    while t.GetName() == "CompositeTransform":
        t = sitk.CompositeTransform(t).GetNthTransform(0)
    t = t.Downcast()
    out = sitk.AffineTransform(2)
    out.SetMatrix(t.GetMatrix())
    out.SetTranslation(t.GetTranslation())
    out.SetCenter(t.GetCenter())
    return out


def register_demons(fixed: sitk.Image, moving: sitk.Image, stage: DeformableStage) -> sitk.Transform:
    """Displacement field on the fixed grid, estimated coarse to fine; moving must already be close."""
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetStandardDeviations(float(stage.field_sigma))
    field = None
    for shrink, iterations in zip(stage.shrink_factors, stage.iterations):
        shrink = int(shrink)
        f, m = fixed, moving
        if shrink > 1:  # anti-alias before subsampling
            f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, 0.5 * shrink), [shrink] * 2)
            m = sitk.Shrink(sitk.SmoothingRecursiveGaussian(m, 0.5 * shrink), [shrink] * 2)
        demons.SetNumberOfIterations(int(iterations))
        if field is None:
            field = demons.Execute(f, m)
        else:  # displacements are in physical units, so the coarse field carries over as is
            field = demons.Execute(f, m, sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID()))
    # Back on the full-resolution grid (a no-op resample when the last level was unshrunk).
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def register(fixed_array: np.ndarray, moving_array: np.ndarray, settings: RegistrationSettings,
             moving_mask: np.ndarray | None = None) -> tuple[sitk.Transform, sitk.Image]:
    """-> (fixed -> moving transform, the moving image histogram-matched to the fixed one).
    ``moving_mask``: the support's labelled pixels, for the local affine stage."""
    fixed, moving = _image(fixed_array), _image(moving_array)
    # Demons and the fusion weights compare intensities directly, so put the support's on the query's scale.
    matched = sitk.HistogramMatching(moving, fixed, numberOfHistogramLevels=64, numberOfMatchPoints=7, thresholdAtMeanIntensity=True)
    affine = register_affine(fixed, matched, settings.affine)
    if moving_mask is not None:
        affine = register_local_affine(fixed, matched, moving_mask, affine, settings.local_affine)
    if settings.deformable.method == "none":
        return affine, matched
    moved = sitk.Resample(matched, fixed, affine, sitk.sitkLinear, 0.0)
    field = register_demons(fixed, moved, settings.deformable)
    # CompositeTransform applies its last transform first: x -> affine(x + u(x)).
    return sitk.CompositeTransform([affine, field]), matched


def warp_support(
    query: np.ndarray, image: np.ndarray, mask: np.ndarray, labels: Sequence[int], settings: RegistrationSettings
) -> tuple[np.ndarray, np.ndarray]:
    """-> (warped support image (S, S) on the query's intensity scale, warped one-hot votes (L, S, S))."""
    held = np.isin(mask, np.asarray(labels)) if settings.local_affine.method != "none" else None
    transform, matched = register(query, image, settings, held)
    channels = [sitk.GetArrayFromImage(matched)] + [(mask == v).astype(np.float32) for v in labels]
    stacked = sitk.GetImageFromArray(np.stack(channels, axis=-1), isVector=True)
    reference = _image(query)
    warped = sitk.GetArrayFromImage(sitk.Resample(stacked, reference, transform, sitk.sitkLinear, 0.0))
    warped = np.moveaxis(warped, -1, 0)
    return warped[0], np.clip(warped[1:], 0.0, 1.0)


# ---------------------------------------------------------------------------------- fusion


def fuse_votes(query: np.ndarray, warped_images: np.ndarray, votes: np.ndarray, stage: FusionStage) -> np.ndarray:
    """Locally weighted voting. warped_images (K, S, S), votes (K, L, S, S) -> probabilities (L, S, S)."""
    sq = (warped_images - query[None]) ** 2
    local_ssd = np.stack([ndimage.gaussian_filter(d, stage.window_sigma, mode="nearest") for d in sq])
    # Subtracting the per-pixel minimum leaves the normalised weights unchanged and avoids underflow.
    weights = np.exp(-(local_ssd - local_ssd.min(axis=0, keepdims=True)) / stage.h)
    weights /= weights.sum(axis=0, keepdims=True)
    return np.einsum("kxy,klxy->lxy", weights, votes).astype(np.float32)


def presence_vote(query: np.ndarray, warped_images: np.ndarray, holds: np.ndarray, stage: FusionStage) -> np.ndarray:
    """Whether each label is on the slice at all: warped_images (K, S, S), holds (K, L) bool -> (L,) bool.

    Local votes decide *where* a label lies; this decides *whether*: the supports that hold the
    label must outweigh those that do not, each weighted by exp(-its global SSD to the query / h),
    the fusion's own scale. Without it, one support in k holding an organ lets the organ appear
    wherever the deformable stage has made that support look like the query.
    """
    if stage.presence == "any":
        return holds.any(axis=0)
    ssd = ((warped_images - query[None]) ** 2).reshape(len(warped_images), -1).mean(axis=1)
    weights = np.exp(-(ssd - ssd.min()) / stage.h)
    return (weights / weights.sum()) @ holds.astype(np.float64) > 0.5


def segment_slice(
    query: np.ndarray,
    supports: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: Sequence[int],
    allowed: Sequence[int],
    settings: RegistrationSettings,
) -> tuple[np.ndarray, dict[str, float], tuple[int, ...]]:
    """One query slice and its (image, mask) supports -> (probabilities (L, S, S), stage seconds,
    the allowed labels the presence vote kept)."""
    probs = np.zeros((len(labels),) + query.shape, np.float32)
    allowed_idx = [i for i, v in enumerate(labels) if v in set(allowed)]
    if not allowed_idx or not supports:
        return probs, {"register": 0.0, "fuse": 0.0}, ()
    t0 = time.perf_counter()
    warped = [warp_support(query, image, mask, labels, settings) for image, mask in supports]
    t1 = time.perf_counter()
    images = np.stack([w[0] for w in warped])
    fused = fuse_votes(query, images, np.stack([w[1] for w in warped]), settings.fusion)
    holds = np.array([[(mask == labels[i]).any() for i in allowed_idx] for _, mask in supports], bool)
    kept = [i for i, keep in zip(allowed_idx, presence_vote(query, images, holds, settings.fusion)) if keep]
    probs[kept] = fused[kept]
    return probs, {"register": t1 - t0, "fuse": time.perf_counter() - t1}, tuple(labels[i] for i in kept)


def carry_slice(target: np.ndarray, neighbours: Sequence[tuple[np.ndarray, np.ndarray]], label: int,
                settings: RegistrationSettings) -> np.ndarray:
    """One slice of a scan from labelled slices of the same scan: each (image, mask) neighbour is
    registered onto ``target`` and their votes for ``label`` fused locally -> probabilities (S, S).
    No presence vote: the neighbours hold the label, and the caller decides where it may be."""
    warped = [warp_support(target, image, mask, (label,), settings) for image, mask in neighbours]
    return fuse_votes(target, np.stack([w[0] for w in warped]), np.stack([w[1] for w in warped]), settings.fusion)[0]


# ---------------------------------------------------------------------------------- 3D consistency


def smooth_along_z(probs: np.ndarray, allowed: np.ndarray, z_weights: Sequence[float]) -> np.ndarray:
    """probs (Z, L, S, S), allowed (Z, L) bool -> z-averaged probabilities, 0 where not allowed.

    The kernel is renormalised over the neighbours where the label is allowed, so a label's map is
    never diluted by (nor spread into) slices whose supports say the organ is absent.
    """
    kernel = np.asarray(z_weights, np.float32)
    radius = len(kernel) // 2
    if radius == 0:
        return probs * allowed[:, :, None, None]
    out = np.zeros_like(probs)
    n = len(probs)
    for z in range(n):
        total = np.zeros(probs.shape[1], np.float32)
        for k, w in enumerate(kernel):
            zz = z + k - radius
            if 0 <= zz < n and w > 0:
                use = allowed[zz].astype(np.float32) * w
                out[z] += use[:, None, None] * probs[zz]
                total += use
        out[z] /= np.maximum(total, 1e-12)[:, None, None]
    return out * allowed[:, :, None, None]


def keep_largest_component(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Per label, zero the above-threshold pixels outside the largest 3D connected component."""
    out = probs.copy()
    structure = np.ones((3, 3, 3), bool)  # neighbours across faces, edges and corners
    for c in range(probs.shape[1]):
        inside = probs[:, c] > threshold
        components, count = ndimage.label(inside, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[:, c][inside & (components != int(sizes.argmax()))] = 0.0
    return out


def object_scores(probs: np.ndarray) -> np.ndarray:
    """(L, S, S) -> (L,) log-odds of each label's highest probability (> 0 means present)."""
    peak = np.clip(probs.reshape(len(probs), -1).max(axis=1) if probs.size else np.zeros(len(probs)), _PROB_CLIP, 1 - _PROB_CLIP)
    return np.log(peak / (1 - peak)).astype(np.float32)


# ---------------------------------------------------------------------------------- the step


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


class RegistrationTransfer:
    """LabelTransfer by multi-atlas registration; needs nothing beyond each support's image and mask."""

    name = "registration"

    def __init__(self, settings: Mapping):
        self.settings = RegistrationSettings.from_settings(settings)
        s = self.settings
        self.pool = WorkerPool(s.workers, s.threads_per_worker, s.start_method, _init_worker, "registration", "slices")

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        self.pool.close()

    def fingerprint(self) -> str:
        """What this step makes the bank store (``LabelTransfer.fingerprint``): nothing beyond the
        canvas slices and masks. Its settings change how supports are registered and fused, never a
        stored entry, so they are not part of it: a run with other fusion or 3D-consistency settings
        shares the bank instead of rebuilding it under a server that uses it."""
        return FINGERPRINT_VERSION

    def encode_supports(self, images: np.ndarray, masks: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
        return {}  # registration works from the image and mask the bank already stores

    def carry(self, scan: np.ndarray, labelled: Mapping[int, np.ndarray], label: int, span: tuple[int, int]) -> np.ndarray:
        """``label`` carried from a scan's ``labelled`` slices (z -> mask) to its other slices in ``span``
        (first, last): each from the nearest labelled slice on either side (``carry_slice``).
        -> probabilities (Z, S, S): the labelled slices' own masks, 0 outside the span."""
        scan = np.asarray(scan, np.float32)
        probs = np.zeros(scan.shape, np.float32)
        for z, mask in labelled.items():
            probs[z] = np.asarray(mask) == label
        given = sorted(labelled)
        jobs = {}
        for z in range(max(span[0], 0), min(span[1], len(scan) - 1) + 1):
            if z in labelled:
                continue
            nearest = (max((g for g in given if g < z), default=None), min((g for g in given if g > z), default=None))
            jobs[z] = (scan[z], [(scan[g], labelled[g]) for g in nearest if g is not None], label, self.settings)

        def record(z: int, result: np.ndarray) -> None:
            probs[z] = result

        left = self.pool.run(carry_slice, jobs, record) if self.settings.workers > 1 and len(jobs) > 1 else jobs
        with sitk_threads(self.settings.threads_per_worker):
            for z, args in left.items():
                record(z, carry_slice(*args))
        return probs

    def segment_volume(self, query: np.ndarray, plans: list[SlicePlan], labels: Sequence[int],
                       cache_key: str | None = None, progress: Progress | None = None) -> VolumeResult:
        s = self.settings
        labels = tuple(int(v) for v in labels)
        query = np.asarray(query, np.float32)
        if len(plans) != len(query):
            raise ValueError(f"{len(plans)} slice plans for a query of {len(query)} slices")
        n = len(query)
        probs = np.zeros((n, len(labels)) + query.shape[1:], np.float32)
        allowed = np.array([[v in plan.labels for v in labels] for plan in plans], bool).reshape(n, len(labels))
        totals = {"register": 0.0, "fuse": 0.0}
        per_slice: list[dict[str, float]] = [{"register": 0.0, "fuse": 0.0} for _ in range(n)]
        work = [z for z in range(n) if allowed[z].any() and plans[z].supports]
        done = n - len(work)  # slices where no label is allowed need no registration
        if progress:
            progress(done, n)
        logger.info("registration transfer: %d of %d slices to register, %d supports each at most, %d worker(s)",
                    len(work), n, max((len(plans[z].supports) for z in work), default=0), s.workers)

        def record(z: int, result) -> None:
            nonlocal done
            probs[z], per_slice[z], present = result
            # Labels the presence vote dropped count as absent for the 3D rules too.
            allowed[z] &= np.isin(labels, present)
            for stage, sec in per_slice[z].items():
                totals[stage] += sec
            done += 1
            if progress:
                progress(done, n)
            if done % s.log_every == 0 or done == n:
                logger.info("registration transfer: %d/%d slices", done, n)

        def job(z: int) -> tuple:
            supports = [(sup.image, sup.mask) for sup in plans[z].supports]
            return (query[z], supports, labels, plans[z].labels, s)

        remaining = work
        if s.workers > 1 and len(work) > 1:
            left = self.pool.run(segment_slice, {z: job(z) for z in work}, record)
            remaining = [z for z in work if z in left]
        if remaining:
            with sitk_threads(s.threads_per_worker):
                for z in remaining:
                    record(z, segment_slice(*job(z)))

        t0 = time.perf_counter()
        c = s.consistency
        probs = smooth_along_z(probs, allowed, c.z_weights)
        if c.largest_component:
            probs = keep_largest_component(probs, c.threshold)
        totals["consistency"] = time.perf_counter() - t0
        slices = [SliceResult(probabilities=probs[z], object_scores=object_scores(probs[z]), seconds=per_slice[z]) for z in range(n)]
        # register/fuse are summed over slices (busy seconds across workers), not wall time.
        return VolumeResult(labels=labels, slices=slices, seconds=totals)
