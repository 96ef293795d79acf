"""Registering one atlas (a labelled scan) to a query scan, in physical space.

The affine stages run in ANTs (antspyx), the deformable ones in SimpleITK: on the development
pairs ANTs' affine aligned better and SimpleITK's demons matched a B-spline (elastix) at a third
of its time (docs/results.md, "How classic was designed"). Four stages, each starting from the
previous one's transform:

1. **global affine** of the whole atlas onto the whole query (Mattes mutual information, centres
   of mass aligned first). Its correlation with the query is what atlas selection ranks by. With
   ``slice_order: geometry`` the atlas's slices are reversed when the world directions of the two
   scans' slice axes point opposite ways (reorienting an oblique stack to RAS snaps its slice axis
   to the nearest cardinal one, and two short-axis stacks cut alike can snap to axes of opposite
   sense: half the CMR files here); ``search`` instead tries both orders and keeps the reversed one
   only when it correlates better by ``slice_order_margin``; ``header`` trusts the canvas order.
2. **region**: the atlas's structures, carried by the global affine onto the query and dilated by
   ``region.margin_mm``. Everything after this works inside that box, so registration spends its
   effort on the anatomy to segment and not on the rest of the field of view.
3. **local affine** on the region (metric restricted to it), then a **3D deformable** stage inside its
   box: MIND-SSC features searched by convexAdam (``deformable.method: mind``, the preset's default,
   transfer/mind.py), which matches structure where the two patients' intensities differ, or demons
   on intensities (``demons``).
4. **in-plane refinement** ("2.5D") for thick-slice stacks: each slice of the registered atlas is
   refined by 2D demons on the query slice. Between slices 8 mm apart a 3D field is interpolated
   over 8 mm; in plane it has 1.25 mm pixels to follow. Used when the query's slices are at least
   ``in_plane.min_slice_mm`` thick, decided per query volume from its spacing.

Demons pyramids are built by hand so that thick slices are never shrunk along z: each level
coarsens every axis towards the same spacing (as ANTs does for its affine levels), so 7.7 mm
slices stay whole while the 1.25 mm pixels are pooled 4 x 4.

Arrays are in canvas order (slice, row, column); SimpleITK images are (x, y, z) = (column, row,
slice), so spacings are reversed on the way in. Nothing here imports torch at import time (only the
MIND stage does, on first use): these functions run in worker processes started with ``spawn``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fewshot.transfer.mind import MindLevels, mind_field
from fewshot.types import Atlas

# antspyx is imported where it is used (2-3 s): worker processes pay it once, on their first atlas.

logger = logging.getLogger(__name__)

RANKINGS = ("image", "region")  # what atlas selection ranks the globally aligned atlases by (GlobalAlignment.rank)


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AffineLevels:
    shrink_factors: tuple[int, ...]  # coarse to fine (ANTs shrinks thick axes less)
    iterations: int  # optimiser iterations per level
    sampling: float  # fraction of voxels drawn at random for the metric


@dataclass(frozen=True)
class DemonsLevels:
    method: str  # "demons" or "none" ("mind" too for the 3D stage: ``RegistrationPlan.mind``)
    shrink_factors: tuple[int, ...]  # coarse to fine (in-plane pixels)
    iterations: tuple[int, ...]  # demons iterations per level
    field_sigma: float  # Gaussian smoothing of the displacement field (voxels): its stiffness


@dataclass(frozen=True)
class InPlaneLevels(DemonsLevels):
    min_slice_mm: float = 4.0  # refine each slice in plane when the query's slices are this thick or more
    # Before the slice's demons: "none", or a 2D "rigid" / "similarity" alignment of the slice. Thick
    # stacks such as cardiac short axis are acquired one breath-hold per slice, so a slice can sit a few
    # millimetres off its neighbours: more than one 3D transform can undo, and more than demons,
    # which smooths its field, moves in one go.
    affine: str = "none"
    # Extra votes from the same atlas with its slices offset along z by these many slices (0 is the
    # registered result itself, always kept), each refined in plane against the query slice it now
    # faces. Between slices 8-10 mm apart the 3D registration can only interpolate, so which atlas
    # slice best matches a query slice is uncertain by about one slice; joint label fusion then
    # weighs these variants by how well each matches locally, as the slice-wise method did with
    # several support slices of one scan.
    slice_shifts: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class RegistrationPlan:
    """Everything that decides how an atlas is registered (one frozen object: it keys the cache)."""

    global_affine: AffineLevels
    local_affine: AffineLevels
    deformable: DemonsLevels
    in_plane: InPlaneLevels
    mind: MindLevels  # the 3D stage's settings when ``deformable.method`` is "mind"
    margin_mm: float  # dilation of the atlas's structures that bounds the region registered
    slice_order: str  # "geometry", "search" or "header"
    slice_order_margin: float  # correlation a reversed slice order must win by


@dataclass
class GlobalAlignment:
    """The global affine of one atlas onto the query, as plain numbers (picklable)."""

    similarity: float  # correlation of the aligned atlas with the query, whole images (decides the slice order)
    reversed_slices: bool
    matrix: tuple[float, ...]  # 9 values, SimpleITK AffineTransform (x, y, z)
    translation: tuple[float, ...]
    center: tuple[float, ...]
    seconds: float = 0.0
    # The same correlation within the region of the atlas's structures (its labels + the plan's margin), where
    # the labels will come from; None when that region misses the query (or an alignment from before it existed).
    region_similarity: float | None = None

    def rank(self, by: str) -> float:
        """What atlas selection ranks by (``RANKINGS``): ``image`` the whole images' correlation, ``region``
        the correlation within the atlas's structures; an atlas whose structures miss the query ranks last
        (its labels would not reach the query; a whole-image score is on another scale)."""
        if by == "region":
            return self.region_similarity if self.region_similarity is not None else float("-inf")
        return self.similarity

    def transform(self) -> sitk.AffineTransform:
        t = sitk.AffineTransform(3)
        t.SetMatrix(self.matrix)
        t.SetTranslation(self.translation)
        t.SetCenter(self.center)
        return t


@dataclass
class Candidate:
    """An atlas registered to the query: its image and label probabilities inside ``box``."""

    image_id: str
    box: tuple[slice, slice, slice]  # region of the query canvas (slice, row, column)
    image: np.ndarray  # (z, y, x) float16: the atlas's intensities, histogram-matched to the query
    probabilities: np.ndarray  # (L, z, y, x) float16, labels in the order asked for
    labels: tuple[int, ...]
    alignment: GlobalAlignment
    in_plane: bool  # whether slices were refined in plane
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (logged, and in bench)
    # (shift, image, probabilities) of the in_plane.slice_shifts variants, same box; fused as more atlases
    shifted: tuple[tuple[int, np.ndarray, np.ndarray], ...] = ()
    # Correlation with the query within its registered structures (transfer/screen.py), set once it is registered
    similarity: float | None = None

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.probabilities.nbytes + sum(i.nbytes + p.nbytes for _, i, p in self.shifted))

    def votes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image, probabilities) of every vote this atlas casts: the registered result, then its variants."""
        return [(self.image, self.probabilities)] + [(i, p) for _, i, p in self.shifted]


# ---------------------------------------------------------------------------------- images


def _image(array: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """(z, y, x) array with spacing along (z, y, x) -> SimpleITK image (origin 0, identity axes)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32), isVector=array.ndim == 4)
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing)[:3])))
    return image


def _image2d(array: np.ndarray, pixel_mm: float) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32), isVector=array.ndim == 3)
    image.SetSpacing((float(pixel_mm), float(pixel_mm)))
    return image


def _vector(image: np.ndarray, mask: np.ndarray, labels: Sequence[int], spacing) -> sitk.Image:
    """Intensities plus one soft (one-hot) channel per label, warped together in one resampling."""
    channels = [image] + [(mask == v).astype(np.float32) for v in labels]
    return _image(np.stack(channels, axis=-1), spacing)


def shrink_per_axis(spacing_xyz: Sequence[float], factor: int) -> list[int]:
    """Shrink factors that coarsen every axis towards ``factor`` x the finest spacing: thick
    slices are left whole until the in-plane pixels have caught up with them."""
    finest = min(spacing_xyz)
    return [max(1, int(round(factor * finest / s))) for s in spacing_xyz]


def downsample(image: sitk.Image, factor: int) -> sitk.Image:
    if factor <= 1:
        return image
    shrink = shrink_per_axis(image.GetSpacing(), factor)
    if all(s == 1 for s in shrink):
        return image
    # Anti-aliasing: a Gaussian of half the new voxel size along each shrunk axis (variance in mm²).
    variance = [(0.5 * s * sp) ** 2 if s > 1 else 0.0 for s, sp in zip(shrink, image.GetSpacing())]
    smooth = sitk.DiscreteGaussian(image, variance=variance, maximumKernelWidth=64, useImageSpacing=True)
    return sitk.Shrink(smooth, shrink)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


# ---------------------------------------------------------------------------------- affine


def _ants_image(array: np.ndarray, spacing: Sequence[float]):
    """(z, y, x) array -> ANTs image whose physical axes are SimpleITK's (x, y, z), so that a
    transform ANTs estimates is used by SimpleITK as it is."""
    import ants

    return ants.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)),
                           spacing=tuple(float(s) for s in reversed(tuple(spacing))))


def _to_sitk(path: str) -> sitk.AffineTransform:
    import ants

    tx = ants.read_transform(path)
    out = sitk.AffineTransform(3)
    out.SetFixedParameters([float(v) for v in tx.fixed_parameters])
    out.SetParameters([float(v) for v in tx.parameters])
    return out


def affine(fixed: np.ndarray, fixed_spacing, moving: np.ndarray, moving_spacing, levels: AffineLevels,
           initial: sitk.AffineTransform | None = None, mask: np.ndarray | None = None) -> sitk.AffineTransform:
    """Multi-resolution affine by ANTs (Mattes MI, random sampling), fixed -> moving point mapping.

    Without ``initial`` ANTs first aligns the centres of mass; ``mask`` (on the fixed grid) restricts
    the metric to a region. ANTs rather than SimpleITK here: on the development pairs its local
    affine put the cardiac structures 6 Dice points closer (docs/results.md)."""
    import tempfile

    import ants

    # antsRegistration draws its metric samples at random; a fixed seed makes an atlas register the
    # same way every time (``set_ants_deterministic`` would also reseed numpy globally, so not that).
    ants.config._random_seed = 1
    with tempfile.TemporaryDirectory(prefix="fewshot-affine-") as tmp:
        kwargs = {}
        if initial is not None:
            start = ants.create_ants_transform(
                transform_type="AffineTransform", dimension=3, matrix=np.asarray(initial.GetMatrix()).reshape(3, 3),
                translation=initial.GetTranslation(), center=initial.GetCenter(),
            )
            ants.write_transform(start, f"{tmp}/initial.mat")
            kwargs["initial_transform"] = f"{tmp}/initial.mat"
        if mask is not None:
            kwargs["mask"] = _ants_image(mask.astype(np.float32), fixed_spacing)
        n = len(levels.shrink_factors)
        result = ants.registration(
            _ants_image(fixed, fixed_spacing), _ants_image(moving, moving_spacing), type_of_transform="Affine",
            aff_metric="mattes", aff_sampling=32, aff_random_sampling_rate=float(levels.sampling),
            aff_iterations=(int(levels.iterations),) * n, aff_shrink_factors=tuple(int(f) for f in levels.shrink_factors),
            aff_smoothing_sigmas=tuple(float(f) / 2 for f in levels.shrink_factors), outprefix=f"{tmp}/", **kwargs,
        )
        return _to_sitk(result["fwdtransforms"][0])


# Canvas axes more oblique to each other than this (cosine) say nothing about how two scans line up.
PARALLEL_AXES = 0.5


def geometric_order(query_directions: Sequence, atlas_directions: Sequence) -> bool | None:
    """True when the atlas's canvas slices run opposite to the query's in world space (reverse them),
    False when they run alike; None when the headers cannot say: a direction unknown, slice axes far
    from parallel, or rows and columns that a slice reversal would not line up (a snap to other
    in-plane axes, which neither order undoes)."""
    if not len(query_directions) or not len(atlas_directions):
        return None
    slices, rows, columns = (float(np.dot(q, a)) for q, a in zip(query_directions, atlas_directions))
    if abs(slices) < PARALLEL_AXES or min(rows, columns) < PARALLEL_AXES:
        return None
    return slices < 0


def slice_orders(plan: RegistrationPlan, query_directions: Sequence, atlas_directions: Sequence) -> tuple[bool, ...]:
    """The slice orders of an atlas to try (True: reversed), by ``plan.slice_order``: ``geometry``
    reads it from the world directions of the two canvases' axes (volume.canvas_directions) and
    searches when they cannot say (``geometric_order``); ``search`` tries both; ``header`` neither."""
    if plan.slice_order == "header":
        return (False,)
    if plan.slice_order == "geometry":
        reverse = geometric_order(query_directions, atlas_directions)
        if reverse is not None:
            return (reverse,)
    return (False, True)


def align_globally(query: np.ndarray, query_spacing, atlas: Atlas, plan: RegistrationPlan,
                   orders: Sequence[bool] | None = None) -> GlobalAlignment:
    """The global affine of ``atlas`` onto ``query``, in each slice order of ``orders`` (default: the
    plan's without geometry, see ``slice_orders``); of two, the reversed one only when it correlates
    better by ``plan.slice_order_margin``."""
    start = time.perf_counter()
    fixed = _image(query, query_spacing)
    orders = tuple(orders) if orders is not None else slice_orders(plan, (), ())
    # Correlations on the finest grid the affine ran on: cheap, and what selection needs.
    coarse = downsample(fixed, plan.global_affine.shrink_factors[-1])
    tried = []
    for reverse in orders:
        image = np.asarray(atlas.image[::-1] if reverse else atlas.image, np.float32)
        moving = _image(image, atlas.spacing)
        transform = affine(query, query_spacing, image, atlas.spacing, plan.global_affine)
        warped = sitk.Resample(moving, coarse, transform, sitk.sitkLinear, 0.0)
        similarity = correlation(sitk.GetArrayViewFromImage(coarse), sitk.GetArrayViewFromImage(warped))
        tried.append((similarity, reverse, transform))
    best = tried[0]
    if len(tried) > 1 and tried[1][0] > tried[0][0] + plan.slice_order_margin:  # (False, True): a reversal must win clearly
        best = tried[1]
    similarity, reverse, t = best
    region = region_correlation(coarse, atlas, reverse, t, plan.margin_mm)
    return GlobalAlignment(similarity, reverse, tuple(t.GetMatrix()), tuple(t.GetTranslation()), tuple(t.GetCenter()),
                           seconds=time.perf_counter() - start, region_similarity=region)


def region_correlation(coarse: sitk.Image, atlas: Atlas, reverse: bool, transform: sitk.Transform,
                       margin_mm: float) -> float | None:
    """Correlation of the aligned atlas with the query (``coarse``: the query on the global affine's finest grid)
    over the box of the atlas's structures (all its labels) moved onto it, widened by ``margin_mm``: where its
    labels will come from.
    A short-axis cardiac slice is mostly body and background, so the whole images' correlation says more about
    the outline than about the heart. None when the region holds fewer than 27 voxels of the query."""
    labelled = np.asarray(atlas.mask[::-1] if reverse else atlas.mask) > 0
    image = np.asarray(atlas.image[::-1] if reverse else atlas.image, np.float32)
    moving = sitk.Compose(_image(image, atlas.spacing), _image(labelled.astype(np.float32), atlas.spacing))
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, coarse, transform, sitk.sitkLinear, 0.0))
    spacing = tuple(reversed(coarse.GetSpacing()))  # (z, y, x)
    region = region_box(warped[None, ..., 1], spacing, margin_mm)
    if region is None or np.prod([r.stop - r.start for r in region]) < 27:
        return None
    return correlation(sitk.GetArrayViewFromImage(coarse)[region], warped[region + (0,)])


# ---------------------------------------------------------------------------------- deformable


def demons(fixed: sitk.Image, moving: sitk.Image, levels: DemonsLevels) -> sitk.Transform | None:
    """Displacement field on the fixed grid, coarse to fine (moving already close and histogram-matched)."""
    if levels.method == "none":
        return None
    filt = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    filt.SetStandardDeviations(float(levels.field_sigma))
    field = None
    for factor, iterations in zip(levels.shrink_factors, levels.iterations):
        f, m = downsample(fixed, factor), downsample(moving, factor)
        filt.SetNumberOfIterations(int(iterations))
        if field is None:
            field = filt.Execute(f, m)
        else:  # displacements are physical, so the coarse field carries over as it is
            field = filt.Execute(f, m, sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID()))
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def _match(moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """Demons compares intensities directly: put the atlas's on the query's scale."""
    return sitk.HistogramMatching(moving, fixed, numberOfHistogramLevels=64, numberOfMatchPoints=7,
                                  thresholdAtMeanIntensity=True)


def margin_voxels(spacing: Sequence[float], margin_mm: float) -> list[int]:
    """``margin_mm`` in voxels along each axis of ``spacing``, at least one (a thick slice's neighbour)."""
    return [max(1, int(np.ceil(margin_mm / s))) for s in spacing]


def region_box(probabilities: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, slice, slice] | None:
    """Bounding box of the voxels any label covers (p > 0.5), dilated by ``margin_mm`` (at least a
    slice along z, so an organ's first and last slices have neighbours to register against)."""
    inside = np.argwhere(probabilities.max(axis=0) > 0.5)
    if not len(inside):
        return None
    shape = probabilities.shape[1:]
    pad = margin_voxels(spacing, margin_mm)
    lo = np.maximum(inside.min(axis=0) - pad, 0)
    hi = np.minimum(inside.max(axis=0) + pad + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _crop(image: sitk.Image, box: tuple[slice, slice, slice]) -> sitk.Image:
    """The query's voxels inside ``box``, keeping their physical positions."""
    z, y, x = box
    return sitk.RegionOfInterest(image, [x.stop - x.start, y.stop - y.start, z.stop - z.start], [x.start, y.start, z.start])


def align_slice(fixed: sitk.Image, moving: sitk.Image, kind: str) -> sitk.Transform | None:
    """A 2D rigid or similarity transform of ``moving`` onto ``fixed`` (correlation, two levels), or
    None when it does not correlate better than leaving the slice where it is."""
    if kind == "none" or not np.any(sitk.GetArrayViewFromImage(moving)) or not np.any(sitk.GetArrayViewFromImage(fixed)):
        return None
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=60)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0])
    shape = sitk.Euler2DTransform() if kind == "rigid" else sitk.Similarity2DTransform()
    start = sitk.CenteredTransformInitializer(fixed, moving, shape, sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method.SetInitialTransform(start, inPlace=False)
    before = method.MetricEvaluate(fixed, moving)
    try:
        found = method.Execute(fixed, moving)
    except RuntimeError:  # e.g. too few overlapping pixels: keep the slice as the 3D stages left it
        return None
    check = sitk.ImageRegistrationMethod()
    check.SetMetricAsCorrelation()
    check.SetInterpolator(sitk.sitkLinear)
    check.SetInitialTransform(found)
    return found if check.MetricEvaluate(fixed, moving) < before else None  # correlation metric: lower is better


def refine_in_plane(query: np.ndarray, warped: np.ndarray, levels: InPlaneLevels, pixel_mm: float) -> np.ndarray:
    """Per slice, a 2D alignment (``levels.affine``) then 2D demons: warped (C, z, y, x) with channel
    0 the intensities -> refined, same shape."""
    out = warped.copy()
    for z in range(query.shape[0]):
        fixed = _image2d(query[z], pixel_mm)
        stacked = _image2d(np.moveaxis(warped[:, z], 0, -1), pixel_mm)
        moving = _match(_image2d(warped[0, z], pixel_mm), fixed)
        moved = False
        aligned = align_slice(fixed, moving, levels.affine)
        if aligned is not None:
            stacked = sitk.Resample(stacked, fixed, aligned, sitk.sitkLinear, 0.0)
            moving = _match(sitk.VectorIndexSelectionCast(stacked, 0), fixed)
            moved = True
        field = demons(fixed, moving, levels)
        if field is not None:
            stacked = sitk.Resample(stacked, fixed, field, sitk.sitkLinear, 0.0)
            moved = True
        if moved:
            out[:, z] = np.moveaxis(sitk.GetArrayFromImage(stacked), -1, 0)
    return out


@dataclass
class Placed:
    """An atlas after its 3D stages (global affine, region, local affine, 3D demons), before the
    in-plane step. Picklable: each slice shift of the in-plane step can run in its own worker."""

    image_id: str
    box: tuple[slice, slice, slice]  # the region registered (query canvas)
    out_box: tuple[slice, slice, slice]  # the region returned: a margin more than ``box``
    warped: np.ndarray  # (1 + L, out_box) float32: the atlas's intensities, then its label probabilities
    labels: tuple[int, ...]
    alignment: GlobalAlignment
    shifts: tuple[int, ...]  # in-plane refinements to run, 0 (the registered result) first; () for thin slices
    pixel_mm: float
    seconds: float
    stages: dict[str, float]

    def inner(self) -> tuple[slice, ...]:
        """``box`` within ``out_box``, channels included: what the in-plane step refines."""
        return (slice(None),) + tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(self.box, self.out_box))

    def refinements(self, query: np.ndarray, levels: InPlaneLevels) -> dict[int, tuple]:
        """shift -> the arguments of ``refine_shift`` for it, one per ``shifts`` (query: the whole canvas)."""
        query_box, before = query[self.box], self.warped[self.inner()]
        return {shift: (query_box, before, shift, levels, self.pixel_mm) for shift in self.shifts}


def place_atlas(query: np.ndarray, query_spacing, atlas: Atlas, labels: Sequence[int], plan: RegistrationPlan,
                alignment: GlobalAlignment | None = None, orders: Sequence[bool] | None = None) -> Placed | None:
    """The 3D stages for one atlas (its global affine in ``orders``, unless ``alignment`` is given);
    None when none of ``labels`` reaches the query."""
    start = time.perf_counter()
    stages = {"global_affine": 0.0}
    if alignment is None:
        alignment = align_globally(query, query_spacing, atlas, plan, orders)
        stages["global_affine"] = alignment.seconds
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = now - clock
        clock = now
    image, mask = (atlas.image[::-1], atlas.mask[::-1]) if alignment.reversed_slices else (atlas.image, atlas.mask)
    fixed = _image(query, query_spacing)
    vector = _vector(np.asarray(image, np.float32), np.asarray(mask), labels, atlas.spacing)
    moving = sitk.VectorIndexSelectionCast(vector, 0)
    global_t = alignment.transform()

    # Region: where the global affine puts the atlas's structures, dilated.
    carried = np.moveaxis(sitk.GetArrayFromImage(sitk.Resample(vector, fixed, global_t, sitk.sitkLinear, 0.0)), -1, 0)
    box = region_box(carried[1:], query_spacing, plan.margin_mm)
    if box is None:
        return None
    # The metric looks at the structures and their surroundings (the dilated shape, not its box).
    pad = margin_voxels(query_spacing, plan.margin_mm)
    region = ndimage.maximum_filter(carried[1:].max(axis=0) > 0.5, size=[2 * p + 1 for p in pad])
    local = affine(query, query_spacing, np.asarray(image, np.float32), atlas.spacing, plan.local_affine,
                   initial=global_t, mask=region)
    reference = _crop(fixed, box)
    lap("local_affine")

    # The 3D deformable stage inside the box, on the atlas resampled there by the local affine.
    moved = sitk.Resample(moving, reference, local, sitk.sitkLinear, 0.0)
    if plan.deformable.method == "mind":
        field = mind_field(reference, moved, plan.mind)
    else:
        field = demons(reference, _match(moved, reference), plan.deformable)
    transform = local if field is None else sitk.CompositeTransform([local, field])  # field first, then affine
    # The result covers a margin more than the box registered (the field is zero there: the local
    # affine alone), so that fusion sees each atlas's own intensities around every atlas's region.
    out_box = region_box(carried[1:], query_spacing, 2 * plan.margin_mm)
    warped = np.moveaxis(sitk.GetArrayFromImage(sitk.Resample(vector, _crop(fixed, out_box), transform, sitk.sitkLinear, 0.0)), -1, 0)
    warped[0] = sitk.GetArrayFromImage(_match(_image(warped[0], query_spacing), _image(query[out_box], query_spacing)))
    lap("deformable")

    in_plane = (plan.in_plane.method != "none" or plan.in_plane.affine != "none") and query_spacing[0] >= plan.in_plane.min_slice_mm
    shifts = (0,) + tuple(s for s in plan.in_plane.slice_shifts if s != 0) if in_plane else ()  # no repeats (validated)
    return Placed(image_id=atlas.image_id, box=box, out_box=out_box, warped=warped, labels=tuple(int(v) for v in labels),
                  alignment=alignment, shifts=shifts, pixel_mm=float(query_spacing[1]),
                  seconds=time.perf_counter() - start, stages=stages)


def refine_shift(query_box: np.ndarray, before: np.ndarray, shift: int, levels: InPlaneLevels,
                 pixel_mm: float) -> tuple[np.ndarray, float]:
    """The in-plane step for one slice shift: query slice z faces the atlas slice registered at
    z + shift (the stack's ends repeat). query_box (z, y, x) and before (C, z, y, x) are the query
    and the placed atlas inside the registered box -> (refined before, seconds)."""
    start = time.perf_counter()
    rows = np.clip(np.arange(before.shape[1]) + shift, 0, before.shape[1] - 1)
    return refine_in_plane(query_box, before[:, rows], levels, pixel_mm), time.perf_counter() - start


def finish_atlas(placed: Placed, refined: dict[int, tuple[np.ndarray, float]]) -> Candidate:
    """A placed atlas and its in-plane refinements (shift -> (refined, seconds), one per
    ``placed.shifts``) -> the Candidate fusion reads."""
    warped, inner = placed.warped, placed.inner()
    shifted = []
    for shift in placed.shifts[1:]:
        variant = warped.copy()
        variant[inner] = refined[shift][0]
        shifted.append((int(shift), variant[0].astype(np.float16), np.clip(variant[1:], 0.0, 1.0).astype(np.float16)))
    if placed.shifts:
        warped = warped.copy()
        warped[inner] = refined[0][0]
    # Seconds of work: the shifts may have run side by side in different workers.
    in_plane_seconds = sum((seconds for _, seconds in refined.values()), 0.0)
    return Candidate(
        image_id=placed.image_id, box=placed.out_box, image=warped[0].astype(np.float16),
        probabilities=np.clip(warped[1:], 0.0, 1.0).astype(np.float16), labels=placed.labels,
        alignment=placed.alignment, in_plane=bool(placed.shifts), seconds=placed.seconds + in_plane_seconds,
        stages={**placed.stages, "in_plane": in_plane_seconds}, shifted=tuple(shifted),
    )


def register_atlas(query: np.ndarray, query_spacing, atlas: Atlas, labels: Sequence[int], plan: RegistrationPlan,
                   alignment: GlobalAlignment | None = None, orders: Sequence[bool] | None = None) -> Candidate | None:
    """All stages for one atlas, one after another -> its registered image and label probabilities
    on the query's canvas grid, inside the region; None when none of ``labels`` reaches the query.
    (``AtlasTransfer`` runs the same stages as separate jobs, so that its workers share the shifts.)"""
    placed = place_atlas(query, query_spacing, atlas, labels, plan, alignment, orders)
    if placed is None:
        return None
    return finish_atlas(placed, {s: refine_shift(*args) for s, args in placed.refinements(query, plan.in_plane).items()})
