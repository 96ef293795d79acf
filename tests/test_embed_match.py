"""DINOv2 embedder, LPIPS matcher and support augmentation, on tiny random networks."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot import weights
from fewshot.config import ConfigError, load_preset
from fewshot.bank_augment import augment_support
from fewshot.types import Embedder, Matcher

AUGMENT = {
    "rotation_deg": 20,
    "scale": [0.8, 1.2],
    "translation": 0.1,
    "shear_deg": 8,
    "brightness": 0.0,
    "contrast": 0.0,
    "gamma": 0.0,
}
JITTER = {"brightness": 0.2, "contrast": 0.3, "gamma": 0.3}


TINY = load_preset("random-tiny")  # its embedder (input_size 56) and matcher (size 64) sections


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def embedder(models):
    from fewshot.embed.dinov2 import Dinov2Embedder

    return Dinov2Embedder(weights.resolve("dinov2-random-tiny", models), TINY["embedder"], "cpu")


@pytest.fixture(scope="module")
def matcher(models):
    from fewshot.match.lpips_match import LpipsMatcher

    return LpipsMatcher(weights.resolve("lpips-alex", models, random_weights=True), TINY["matcher"], "cpu")


def phantom(size: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth blob image with some texture, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = 0.5 * np.exp(-((yy - 0.45) ** 2 + (xx - 0.55) ** 2) / 0.05) + 0.2 * np.sin(9 * xx) ** 2
    return np.clip(img + 0.05 * rng.random((size, size)), 0, 1).astype(np.float32)


def square_slice(size: int = 96):
    image = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.uint16)
    image[30:50, 52:70] = 1.0
    mask[30:50, 52:70] = 500
    mask[70:80, 20:30] = 200  # a second label with no image counterpart
    return image, mask


def centroid(binary: np.ndarray) -> np.ndarray:
    return np.argwhere(binary).mean(axis=0)


# --- embedder ---------------------------------------------------------------------------------


def test_embeddings_are_unit_vectors_of_the_declared_size(embedder):
    assert isinstance(embedder, Embedder) and embedder.index_transform == ""
    images = np.stack([phantom(96, s) for s in range(3)] + [np.zeros((96, 96), np.float32)])
    vectors = embedder.embed(images)
    assert vectors.shape == (4, embedder.dim) and embedder.dim == 2 * 32 and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.abs(vectors[0] - vectors[3]).max() > 1e-3  # different slices, different vectors


def test_embeddings_are_deterministic_and_batch_independent(embedder):
    images = np.stack([phantom(80, s) for s in range(35)])  # more than one batch of 32
    first = embedder.embed(images)
    np.testing.assert_array_equal(first, embedder.embed(images))
    np.testing.assert_allclose(first[33], embedder.embed(images[33:34])[0], atol=1e-5)


def test_embedder_name_identifies_the_weights(embedder, models):
    fingerprint = weights.checkpoint_fingerprint(weights.resolve("dinov2-random-tiny", models))
    assert embedder.name == f"dinov2-56-{fingerprint[:12]}"


def test_input_size_must_be_a_multiple_of_the_patch(models):
    from fewshot.embed.dinov2 import Dinov2Embedder

    with pytest.raises(ConfigError, match="multiple"):
        Dinov2Embedder(weights.resolve("dinov2-random-tiny", models), dict(TINY["embedder"], input_size=50), "cpu")


# --- matcher ----------------------------------------------------------------------------------


def test_lpips_distance_is_smallest_for_the_query_itself(matcher):
    assert isinstance(matcher, Matcher)
    query = phantom(96, 1)
    rng = np.random.default_rng(3)
    candidates = np.stack(
        [
            np.roll(query, 8, axis=1),
            np.clip(query + rng.normal(0, 0.15, query.shape), 0, 1),
            query,
            np.clip(query + rng.normal(0, 0.03, query.shape), 0, 1),
        ]
    ).astype(np.float32)
    d = matcher.distances(query, candidates)
    assert d.shape == (4,) and d.dtype == np.float32
    assert d[2] == pytest.approx(0.0, abs=1e-6) and np.argmin(d) == 2
    assert d[0] > d[2] + 1e-4 and d[1] > d[2] + 1e-4
    assert d[1] > d[3] > d[2]  # more noise, farther
    np.testing.assert_array_equal(d, matcher.distances(query, candidates))  # deterministic
    np.testing.assert_allclose(matcher.distances(query, candidates[1:2]), d[1:2], rtol=1e-5)


def test_lpips_rejects_bad_shapes(matcher):
    with pytest.raises(ValueError):
        matcher.distances(np.zeros((2, 8, 8), np.float32), np.zeros((1, 8, 8), np.float32))
    assert matcher.distances(np.zeros((64, 64), np.float32), np.zeros((0, 64, 64), np.float32)).shape == (0,)


# --- augmentation -----------------------------------------------------------------------------


def test_augmented_mask_keeps_labels_and_follows_the_image():
    image, mask = square_slice()
    out = augment_support(image, mask, 6, AUGMENT, np.random.default_rng(7))
    assert len(out) == 6
    moved = 0
    for a in out:
        assert a.image.dtype == np.float32 and a.mask.dtype == np.uint16 and a.image.shape == image.shape
        assert 0.0 <= a.image.min() and a.image.max() <= 1.0
        assert set(np.unique(a.mask)) <= {0, 200, 500}
        assert 500 in a.mask
        # the bright square and its label moved together
        np.testing.assert_allclose(centroid(a.image > 0.5), centroid(a.mask == 500), atol=1.0)
        moved += np.abs(centroid(a.mask == 500) - centroid(mask == 500)).max() > 1.5
        assert a.description.startswith("rot=") and "scale=" in a.description and "shift=(" in a.description
    assert moved >= 4  # the transform is not an identity


def test_augmentation_is_deterministic_for_a_seed():
    image, mask = square_slice()
    params = {**AUGMENT, **JITTER}
    a = augment_support(image, mask, 3, params, np.random.default_rng(11))
    b = augment_support(image, mask, 3, params, np.random.default_rng(11))
    c = augment_support(image, mask, 3, params, np.random.default_rng(12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
        assert x.description == y.description
    assert a[0].description != c[0].description


def test_colour_jitter_changes_the_image_only():
    image, mask = square_slice()
    image = 0.2 + 0.6 * image  # room for brightness to move both ways
    plain = augment_support(image, mask, 3, AUGMENT, np.random.default_rng(5))
    jittered = augment_support(image, mask, 3, {**AUGMENT, **JITTER}, np.random.default_rng(5))
    for p, j in zip(plain, jittered):
        np.testing.assert_array_equal(p.mask, j.mask)
        assert np.abs(p.image - j.image).max() > 0.02
        assert "gamma=1.00" in p.description and "gamma=1.00" not in j.description


def test_zero_count_and_shape_checks():
    image, mask = square_slice()
    assert augment_support(image, mask, 0, AUGMENT, np.random.default_rng(0)) == []
    with pytest.raises(ValueError):
        augment_support(image, mask[:10], 1, AUGMENT, np.random.default_rng(0))
