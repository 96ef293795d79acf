"""Probabilities -> labels: each rule on the voxels where they differ, the same rule in the final
label map, pieces, shape and provenance, and the atlas step handing its own rule to the engine."""
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fewshot.config import ConfigError, load_preset
from fewshot.decision import LabelDecision
from fewshot.transfer.pieces import keep_pieces
from fewshot.transfer.shape import make_convex
from fewshot.settings import VolumeSettings
from fewshot.volume import canvas_to_label, label_to_canvas, read_label, read_volume, volume_to_canvas

# One voxel per column: (myocardium, blood pool) shares of one vote, background the remainder.
VOTES = np.array([
    [0.45, 0.35, 0.60, 0.10, 0.30],  # myocardium
    [0.45, 0.25, 0.10, 0.10, 0.25],  # blood pool
], np.float32)  # background: 0.10, 0.40, 0.30, 0.80, 0.45


def test_rules_differ_only_where_no_label_holds_half_the_vote():
    assert LabelDecision(0.5, "threshold").decide(VOTES).tolist() == [-1, -1, 0, -1, -1]
    # The most probable of background (1 - sum) and the labels.
    assert LabelDecision(0.5, "distribution").decide(VOTES).tolist() == [0, -1, 0, -1, -1]
    # Foreground when the labels together pass the threshold (0.90, 0.60, 0.70, 0.20, 0.55), then the best label.
    assert LabelDecision(0.5, "foreground").decide(VOTES).tolist() == [0, 0, 0, -1, 0]
    assert LabelDecision(0.75, "foreground").decide(VOTES).tolist() == [0, -1, -1, -1, -1]
    assert LabelDecision().decide(np.zeros((0, 3, 4))).shape == (3, 4)


def test_a_rule_or_threshold_that_means_nothing_is_refused():
    with pytest.raises(ValueError, match="rule"):
        LabelDecision(0.5, "vote")
    with pytest.raises(ValueError, match="threshold"):
        LabelDecision(1.0, "foreground")


def ring_label(shape=(40, 40, 3)) -> np.ndarray:
    """A myocardium-like ring (label 1) around a disc (label 2), on every slice."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] - (np.asarray(shape[:2]).reshape(2, 1, 1) - 1) / 2
    r = np.hypot(yy, xx)
    plane = np.where(r < 8, 2, np.where(r < 12, 1, 0)).astype(np.uint16)
    return np.repeat(plane[..., None], shape[2], axis=2)


def test_the_final_label_map_has_no_hole_where_ring_and_disc_split_the_vote(tmp_path):
    """Fused as a distribution, the pixels where ring and disc meet were voted 0.45 / 0.45 / 0.1:
    under a threshold on the largest share they became background, a hole through the ring."""
    label = ring_label()
    path = tmp_path / "ring.nii.gz"
    # At the canvas's own 1.25 mm, so the label map is the canvas's decision itself, not a resampling of it.
    nib.save(nib.Nifti1Image(label.astype(np.float32), np.diag([1.25, 1.25, 8.0, 1.0])), str(path))
    volume = read_volume(path)
    _, geometry = volume_to_canvas(volume, VolumeSettings.from_settings(load_preset("classic")["volume"]))
    masks = label_to_canvas(read_label(path, volume), geometry)
    probs = np.stack([(masks == v) * 0.95 for v in (1, 2)], axis=1).astype(np.float32)
    meet = (masks == 1) & ndimage.binary_dilation(masks == 2, np.ones((1, 3, 3), bool))
    probs[:, 0][meet] = probs[:, 1][meet] = 0.45
    split = canvas_to_label(probs, [1, 2], geometry, LabelDecision(0.5, "threshold"))
    shared = canvas_to_label(probs, [1, 2], geometry, LabelDecision(0.5, "distribution"))
    inside = label > 0
    assert split.shape == shared.shape == label.shape
    assert (split[inside] == 0).mean() > 0.03  # the hole: a one-pixel ring where they meet
    assert np.array_equal(shared, label)


def test_pieces_and_shape_decide_by_the_same_rule():
    """Two blobs of label 1 joined by a bridge whose votes label 1 and label 2 split: one piece under
    the distribution rule (nothing is removed), two under the threshold rule (the smaller one goes)."""
    probs = np.zeros((2, 1, 9, 20), np.float32)
    probs[0, 0, 2:7, 1:8] = probs[0, 0, 3:6, 12:16] = 0.95
    probs[:, 0, 4, 8:12] = 0.45
    kept = keep_pieces(probs, (1, 2), {1: 1, 2: 1}, LabelDecision(0.5, "distribution"))
    assert np.array_equal(kept, probs)
    cut = keep_pieces(probs, (1, 2), {1: 1, 2: 1}, LabelDecision(0.5, "threshold"))
    assert cut[0, 0, 3:6, 12:16].max() == 0 and cut[0, 0, 2:7, 1:8].min() == np.float32(0.95)
    # The shape step: a convex label 2 disc with a notch the ring (label 1) took by a split vote is
    # only refilled where the rule says the ring holds the notch.
    disc = np.zeros((2, 1, 21, 21), np.float32)
    yy, xx = np.mgrid[:21, :21] - 10
    disc[1, 0][np.hypot(yy, xx) < 8] = 0.9
    notch = (np.hypot(yy, xx) < 8) & (xx > 4) & (abs(yy) < 2)
    disc[1, 0][notch], disc[0, 0][notch] = 0.3, 0.45
    for rule in ("threshold", "distribution"):
        decision = LabelDecision(0.5, rule)
        out = decision.decide(make_convex(disc, (1, 2), [2], decision, 1.0))[0]
        if rule == "distribution":
            assert (out[notch] == 1).all(), "the convex disc takes back the notch the ring won"
        else:
            assert (out[notch] == -1).all(), "background under the threshold: nothing to take back"


def test_the_atlas_step_hands_its_rule_to_the_engine(tmp_path):
    from fewshot.engine import Engine
    from fewshot.transfer.atlas import AtlasTransfer

    good = load_preset("classic")["transfer"]
    assert AtlasTransfer({**good, "decision": "foreground"}).label_decision == LabelDecision(good["threshold"], "foreground")
    with pytest.raises(ConfigError, match="decision"):
        AtlasTransfer({**good, "decision": "vote"})
    engine, _ = Engine.from_settings(load_preset("classic", {"transfer.decision": "distribution"}), bank_dir=tmp_path / "a")
    assert engine.label_decision == LabelDecision(good["threshold"], "distribution")
    engine.transfer.close()
    engine, _ = Engine.from_settings(load_preset("classic-slices"), bank_dir=tmp_path / "b")
    assert engine.label_decision == LabelDecision(0.5, "threshold")  # a step without a rule of its own
