"""Label fusion: several registered atlases -> one probability per label and voxel.

``joint`` is joint label fusion (Wang, Suh, Das, Pluta, Craige & Yushkevich, PAMI 2013), run by
ANTs' ``antsJointFusion`` through antspyx. At each voxel every atlas votes with a weight that
says how well its intensities match the query's in a patch around the voxel, and the weights
are solved jointly so that atlases making the *same* mistakes (correlated patch differences)
share one vote instead of outvoting a better atlas; a local search (``search_radius``) lets each
atlas offer its best-matching nearby patch. Measured against a locally weighted vote and a plain
majority on the development pairs (docs/results.md), it was the most accurate from 2 atlases on.

Where every atlas gives a voxel the same label, any weights summing to one give that label, so
fusion runs only where the atlases disagree (dilated by one voxel): the same result, about half
the time on CHAOS. There the fused probability is the atlases' mean soft vote.

``implementation: vectorised`` (the default) computes ANTs' algorithm on whole arrays in torch
(``transfer/joint_fusion.py``): 4-5.6x faster, the same Dice (docs/results.md, "Joint fusion
vectorised"); ``ants`` runs ``antsJointFusion`` itself and is the
reference the tests compare with.

``majority`` (the mean of the atlases' soft votes) is kept for the ablation.

Two switches of ``antsJointFusion`` are settings. ``correlation`` (``-m PC``, on in the preset: the local
search compares patches by Pearson correlation, ANTs' own default, where antspyx uses mean squares): with
today's patches and registration it won nested selection on CMR in every group and lost on CHAOS at 1 and 3
shots, and one setting chosen over both datasets' growth curves at once chose it in every group. Its labels
are antsJointFusion's but where an atlas's chosen patch is flat (``flat_atlas_patches``; docs/results.md,
"Joint fusion's search by correlation", 27th session). ``correlation: N`` switches it on from N atlases, and
``correlation: bank`` lets the bank's own atlases choose (``fusion_choice.py``). ``nonnegative`` (``-c 1``,
off: non-negative joint weights): what nested selection's choice of it was worth was mixed across runs (+0.5
to −0.3 Dice) and the constraint costs 30–50 % more fusion time (docs/results.md, "Joint fusion's patch search by correlation").

An atlas refined in plane with slice offsets (``in_plane.slice_shifts``) casts several variants.
``shifted_votes: joint`` hands every variant to joint fusion as a vote of its own (K atlases x S
shifts votes: the fusion's cost grows with their square). ``local`` first merges one atlas's
variants into one vote by locally weighted voting (Artaechevarria, Munoz-Barrutia & Ortiz-de-Solorzano,
IEEE TMI 2009): at each voxel a variant weighs the inverse of its patch's mean squared difference
from the query, to the power ``beta``, which is joint fusion's weight without the correlation term.
The variants of one atlas share its registration and differ only by which slice faces the query,
so their errors are the correlated ones joint fusion would pool anyway; joint fusion then weighs K
votes, one per atlas. Measured: 3.8x faster fusion, but it lost to ``joint`` in every group of nested
selection on CMR (1 and 3 shots; the thin myocardium most: blending blurs it), so ``joint`` is the
default and ``local`` an option for speed (docs/results.md, "Faster fusion of the shifted votes").
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from fewshot.transfer.workers import pin_ants_threads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionSettings:
    method: str  # "joint" or "majority"
    beta: float  # joint: exponent sharpening the weights of patch differences
    patch_radius: tuple[int, ...]  # joint: patch half-size in voxels along (slice, row, column)
    # joint: voxels each atlas may shift its patch to match the query's; one number for every axis, or
    # three along (slice, row, column), so that thick slices can search in plane without crossing slices
    search_radius: int | tuple[int, ...]
    rho: float  # joint: ridge on the error-correlation matrix (robustness against its noise)
    threads: int  # ITK threads antsJointFusion uses (the vectorised fusion runs on torch's threads)
    # How an atlas's slice-shifted variants vote: "joint" (each its own vote in joint fusion) or
    # "local" (merged per atlas by locally weighted voting first; see the module's docstring)
    shifted_votes: str = "joint"
    # joint: antsJointFusion's -c (the joint weights constrained to be >= 0) and -m PC (the search
    # picks each atlas's best-matching nearby patch by Pearson correlation, ANTs' own default, instead
    # of mean squares, antspyx's default; the weights themselves are computed the same way)
    nonnegative: bool = False
    # true, false, "bank" (chosen per bank by leaving each atlas out in turn: transfer/fusion_choice.py), or
    # a number N >= 2: correlation when a query fuses N atlases or more, mean squares below (``fusion_rule``).
    # False here, as in antspyx; the classic preset sets true
    correlation: bool | str | int = False
    # joint: who computes it. "vectorised" (transfer/joint_fusion.py: ANTs' algorithm on whole arrays in torch,
    # 4-5.6x faster) or "ants" (antsJointFusion through antspyx, the reference; the only one
    # with `nonnegative`)
    implementation: str = "vectorised"
    # joint, vectorised: how an atlas patch with no contrast (zero fill where a registered atlas has no data) enters
    # the weights. "centred": all zeros after normalising, so it differs from any query patch with contrast and
    # weighs little; "ants": its row of M zero, as antsJointFusion's normalisation leaves an exactly flat patch
    # (it divides by zero), which gives the empty atlas the largest weight (joint_fusion.py; a nearly flat one
    # antsJointFusion divides by its tiny deviation instead). antsJointFusion itself (implementation: ants)
    # always does the latter.
    flat_atlas_patches: str = "centred"


def fusion_rule(correlation) -> int | None:
    """The number of fused atlases from which ``correlation: N`` searches by correlation; None for true, false
    and bank. A rule by the atlases' count because nested selection chose mean squares on the abdomen with
    1 and 3 atlases and correlation with 5, and correlation on cardiac MRI at every count (docs/results.md)."""
    return correlation if isinstance(correlation, int) and not isinstance(correlation, bool) else None


def measure_for(correlation, atlases: int) -> bool:
    """Whether ``correlation`` (true, false or a number N of atlases) searches by correlation for a query offered
    ``atlases`` atlases: from N atlases on for a number. ``bank`` is chosen per bank (fusion_choice.py), not here."""
    rule = fusion_rule(correlation)
    if rule is not None:
        return atlases >= rule
    if not isinstance(correlation, bool):
        raise ValueError(f"fusion.correlation {correlation!r} is chosen per bank, not by a count of atlases")
    return correlation


def search_radius(radius) -> int | str:
    """antsJointFusion's ``-s``: one radius, or ``RxRxR`` along the image's axes (slice, row, column here)."""
    if isinstance(radius, (tuple, list)):
        return "x".join(str(int(r)) for r in radius)
    return int(radius)


def majority(probabilities: np.ndarray) -> np.ndarray:
    """(K, L, ...) soft votes -> (L, ...) their mean."""
    return np.asarray(probabilities, np.float32).mean(axis=0)


def _hard(probabilities: np.ndarray) -> np.ndarray:
    """(K, L, ...) -> (K, ...) label index + 1 where an atlas's most likely label exceeds 0.5, else 0 (values 0..L),
    in the smallest unsigned integers that hold L. Small, because every array the fusion makes is fresh memory:
    on a CHAOS query the float32 labels, their int64 copy and the cut's intermediate copies cost 5-7 s of page
    faults on a cold process (docs/results.md, "Fewer fresh arrays before the fusion's search")."""
    p = np.asarray(probabilities, np.float32)
    # argmax over the label axis, one label at a time: the first of equal maxima wins, as in argmax, which over
    # a middle axis of large arrays took 1.8-3.7x as long (15 x 4 x 31 x 256 x 229 votes: 1.0-2.2 s against 0.6 s)
    best = p[:, 0].copy()
    index = np.zeros(p.shape[:1] + p.shape[2:], np.min_scalar_type(p.shape[1]))
    for channel in range(1, p.shape[1]):
        np.copyto(index, channel, where=p[:, channel] > best)
        np.maximum(best, p[:, channel], out=best)
    index += 1
    index *= best > 0.5  # 0 where no label passes 0.5 (and where the best is NaN, as `best > 0.5` was before)
    return index


def disagreement(hard: np.ndarray) -> np.ndarray:
    """Voxels where some atlas differs from the first, dilated by one voxel (patches need context)."""
    differs = (hard != hard[:1]).any(axis=0)
    return ndimage.binary_dilation(differs, structure=np.ones((3,) * differs.ndim, bool)) if differs.any() else differs


def merge_variants(query: np.ndarray, images: np.ndarray, probabilities: np.ndarray,
                   patch_radius: Sequence[int], beta: float) -> tuple[np.ndarray, np.ndarray]:
    """One atlas's variants -> one vote. query (z, y, x), images (S, z, y, x), probabilities
    (S, L, z, y, x) -> (image, probabilities) weighted per voxel by the variants' local agreement."""
    images = np.asarray(images, np.float32)
    if len(images) == 1:
        return images[0], np.asarray(probabilities[0], np.float32)
    size = [2 * int(r) + 1 for r in patch_radius]
    error = np.stack([ndimage.uniform_filter((image - query) ** 2, size=size, mode="nearest") for image in images])
    # The floor keeps a perfect patch from taking an infinite weight; it is small on the query's scale.
    floor = 1e-3 * float(np.var(query)) + 1e-12
    weights = (error + floor) ** (-float(beta))
    weights /= weights.sum(axis=0, keepdims=True)
    image = (weights * images).sum(axis=0)
    merged = np.einsum("s...,sl...->l...", weights, np.asarray(probabilities, np.float32))
    return image.astype(np.float32), merged.astype(np.float32)


def joint(query: np.ndarray, images: np.ndarray, probabilities: np.ndarray, spacing: Sequence[float],
          settings: FusionSettings) -> np.ndarray:
    """query (z, y, x), images (K, z, y, x), probabilities (K, L, z, y, x) -> (L, z, y, x)."""
    out = majority(probabilities)
    k = len(images)
    if k < 2:
        return out
    hard = _hard(probabilities)
    region = disagreement(hard)
    if not region.any() or not hard[:, region].any():
        return out
    if settings.implementation == "vectorised":
        if settings.nonnegative:
            raise ValueError("fusion.nonnegative needs fusion.implementation: ants")
        return _placed(out, region, zip(*_vectorised(query, images, hard, region, spacing, settings)))
    pin_ants_threads(settings.threads)
    import ants  # heavy (2-3 s): only where fusion runs

    def image(array):
        return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), spacing=tuple(float(s) for s in spacing))

    with tempfile.TemporaryDirectory(prefix="fewshot-jlf-") as tmp:  # antspyx writes its outputs to files
        result = ants.joint_label_fusion(
            image(query), image(region.astype(np.float32)), [image(a) for a in images],
            beta=float(settings.beta), rad=[int(r) for r in settings.patch_radius], label_list=[image(h) for h in hard],
            rho=float(settings.rho), r_search=search_radius(settings.search_radius), output_prefix=f"{tmp}/jlf",
            nonnegative=bool(settings.nonnegative), usecor=bool(settings.correlation),
        )
        return _placed(out, region, ((int(round(float(number))), probability.numpy()[region])
                                     for number, probability in zip(result["segmentation_numbers"],
                                                                    result["probabilityimages"])))


def _placed(out: np.ndarray, region: np.ndarray, posteriors) -> np.ndarray:
    """Fusion's (label number, posterior over ``region``) pairs written into ``out`` (L, ...) over the region;
    label 0 (background) and numbers outside 1..L have no channel."""
    out[:, region] = 0.0
    for number, posterior in posteriors:
        if 1 <= number <= out.shape[0]:
            out[int(number) - 1][region] = posterior
    return out


def _vectorised(query, images, hard, region, spacing, settings: FusionSettings):
    # torch's own thread count (the process's cores, or a batch worker's budget), not `threads`: setting it
    # here would change it for the whole process
    from fewshot.transfer.joint_fusion import fuse_jointly
    radius = settings.search_radius
    radius = tuple(int(r) for r in radius) if isinstance(radius, (tuple, list)) else (int(radius),) * 3
    return fuse_jointly(query, images, hard, region, spacing, settings.patch_radius, radius,
                        beta=float(settings.beta), alpha=float(settings.rho), correlation=bool(settings.correlation),
                        flat_atlas_patches=settings.flat_atlas_patches)


def fuse(query: np.ndarray, images: np.ndarray, probabilities: np.ndarray, spacing: Sequence[float],
         settings: FusionSettings) -> np.ndarray:
    if settings.correlation not in (True, False):
        raise ValueError(f"fusion.correlation {settings.correlation!r}: 'bank' and a number of atlases are resolved "
                         "per segmentation before fusing (AtlasTransfer._fusion_for)")
    if settings.method == "majority":
        return majority(probabilities)
    return joint(query, images, probabilities, spacing, settings)
