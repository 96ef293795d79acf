"""A weights-free slice descriptor: intensity thumbnail + gradient-orientation histograms.

The thumbnail says *what the slice looks like* at a glance (where bright and dark tissue sit);
the histograms of gradient orientations over a coarse grid of cells (HOG-like) say *which
edges run where*, which survives the contrast differences between scanners and patients.
Both are computed for a whole batch at once with matrix products (area resampling) and array
arithmetic, so there are no per-pixel Python loops. About 2.5 ms per 256² slice on one core;
splitting a volume over two threads measured no faster (82 vs 88 ms for 37 slices), so it stays
single-threaded.

``embed`` returns the raw descriptor; the bank's faiss index whitens it with a PCA fitted on
the bank's own entries and L2-normalises it (``index_transform``), so inner products compare
slices along the directions in which the bank's slices actually differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fewshot.config import ConfigError
from fewshot.settings import typed_section


_EPS = 1e-6


@dataclass(frozen=True)
class DescriptorSettings:
    thumbnail: int  # thumbnail side (pixels)
    orientations: int  # orientation bins over [0, pi)
    cells: int  # the gradient histograms are pooled over cells x cells cells
    gradient_size: int  # gradients are taken on the slice resampled to this side
    pca_dims: int  # PCA-whitened dimensions kept in the bank's index

    @classmethod
    def from_settings(cls, settings: Mapping) -> "DescriptorSettings":
        out = typed_section(cls, settings, "embedder", "configs/presets/classic.yaml", strict=True)
        if min(out.thumbnail, out.orientations, out.cells, out.gradient_size, out.pca_dims) < 1:
            raise ConfigError(f"embedder descriptor settings must be positive integers: {out}")
        return out


def area_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix whose rows average the source pixels each output pixel covers (area resampling)."""
    edges = np.linspace(0.0, src, dst + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return (overlap / (hi - lo)).astype(np.float32)


def area_resize(images: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """(..., H, W) -> (..., height, width) by area averaging (anti-aliased downsampling)."""
    width = height if width is None else width
    rows = area_matrix(images.shape[-2], height)
    cols = area_matrix(images.shape[-1], width)
    return rows @ images @ cols.T


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + _EPS)


class DescriptorEmbedder:
    """Canvas slices -> thumbnail + gradient-orientation histogram vectors, no weights."""

    name = "descriptor"

    def __init__(self, settings: Mapping):
        self.settings = DescriptorSettings.from_settings(settings)
        s = self.settings
        self.dim = s.thumbnail * s.thumbnail + s.cells * s.cells * s.orientations
        if s.pca_dims > self.dim:
            raise ConfigError(f"embedder pca_dims {s.pca_dims} exceeds the descriptor's {self.dim} dimensions")
        self.index_transform = f"PCAW{s.pca_dims},L2norm"

    def embed(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, S, S) float32 in [0, 1] -> (N, dim) float32; each block has unit L2 norm."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3:
            raise ValueError(f"expected (N, S, S) slices, got shape {images.shape}")
        parts = [self._embed_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _embed_batch(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self._thumbnails(images), self._orientation_histograms(images)], axis=1).astype(np.float32)

    def _thumbnails(self, images: np.ndarray) -> np.ndarray:
        t = area_resize(images, self.settings.thumbnail).reshape(len(images), -1)
        # Zero mean, unit norm: invariant to the per-volume brightness and contrast left by normalisation.
        t = t - t.mean(axis=1, keepdims=True)
        return _unit_rows(t)

    def _orientation_histograms(self, images: np.ndarray) -> np.ndarray:
        s = self.settings
        small = area_resize(images, s.gradient_size)
        gy, gx = np.gradient(small, axis=(1, 2))
        magnitude = np.hypot(gx, gy)
        # Unsigned orientation: which way an edge runs, not which side is brighter, since the
        # contrast between two tissues can flip between sequences and scanners.
        position = (np.arctan2(gy, gx) % np.pi) / np.pi * s.orientations - 0.5
        lower = np.floor(position)
        upper_share = position - lower
        lower_bin = lower.astype(np.int64) % s.orientations
        upper_bin = (lower_bin + 1) % s.orientations
        # Soft binning: each gradient is split between its two nearest orientation bins.
        votes = np.empty((len(images), s.orientations) + small.shape[1:], np.float32)
        for o in range(s.orientations):  # a loop over bins (8), each a whole-batch array operation
            votes[:, o] = magnitude * ((lower_bin == o) * (1.0 - upper_share) + (upper_bin == o) * upper_share)
        cells = area_resize(votes, s.cells).reshape(len(images), -1)
        # Square root (Hellinger) damps the few strong edges, then unit norm: contrast invariant.
        return _unit_rows(np.sqrt(_unit_rows(cells)))
