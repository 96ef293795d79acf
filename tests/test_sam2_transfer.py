"""SAM 2 label transfer on a tiny randomly initialised SAM 2.1, saved and loaded like real weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.transfer.sam2_memory import Sam2Transfer, propagation_order
from fewshot.transfer.sam2_parts import PAYLOAD_KEYS, payload_for_labels
from fewshot.transfer.sam2_model import (
    CheckpointMismatchError,
    build_sam2_model,
    save_random_checkpoint,
)
from fewshot.types import SlicePlan, Support, SupportRef

TINY_CONFIG = "sam2/sam2_random_tiny.yaml"
HIERA_TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"  # inside the installed sam2 package
LABELS = (200, 500, 600)
S = 96  # canvas side; the model resizes to its image_size (128)
SETTINGS = {"image_size": 128, "neighbours": 2, "mask_threshold": 0.0, "feature_cache": 2}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small to gain from threads, and on a busy 2-core machine
    OpenMP threads spinning against each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_random_checkpoint(TINY_CONFIG, tmp_path_factory.mktemp("sam2") / "tiny.pt", seed=0)


def transfer_with_object_bias(checkpoint: Path, bias: float | None, **settings) -> Sam2Transfer:
    """A transfer whose object-score head is pushed to say "present" (bias > 0) or "absent" (< 0).

    Random weights give object-score logits close to 0, so the mask logits would often be hidden
    behind "object absent"; the tests that look at masks force presence to see them.
    """
    transfer = Sam2Transfer.from_settings({**SETTINGS, **settings}, checkpoint, TINY_CONFIG, "cpu", "sam2-random-tiny")
    if bias is not None:
        with torch.no_grad():
            transfer.model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(bias)
    return transfer


@pytest.fixture(scope="module")
def transfer(checkpoint) -> Sam2Transfer:
    return transfer_with_object_bias(checkpoint, 10.0)


@pytest.fixture(scope="module")
def supports_data():
    rng = np.random.default_rng(0)
    images = rng.random((6, S, S), dtype=np.float32)
    masks = np.zeros((6, S, S), np.uint16)
    masks[:, 20:50, 20:50] = 200
    masks[:3, 60:80, 55:85] = 500  # label 500 only on the first three; 600 nowhere
    return images, masks


def make_plans(payload, images, masks, z_count, support_ids, allowed=(200, 500), empty=(), scores=None):
    plans = []
    for z in range(z_count):
        supports = [
            Support(
                ref=SupportRef("support", i),
                image=images[i],
                mask=masks[i],
                labels=tuple(v for v in LABELS if np.any(masks[i] == v)),
                score=float(scores[z]) if scores is not None else 0.5,
                payload={k: payload[k][i] for k in PAYLOAD_KEYS},
            )
            for i in support_ids
        ]
        plans.append(SlicePlan(z, supports, () if z in empty else allowed))
    return plans


def query_volume(z_count, seed=1):
    return np.random.default_rng(seed).random((z_count, S, S), dtype=np.float32)


class EncoderCounter:
    """Counts images through the SAM 2 image encoder (a forward hook, removed on exit)."""

    def __init__(self, model):
        self.model, self.images, self.calls = model, 0, 0

    def __enter__(self):
        def hook(module, args, output):
            self.calls += 1
            self.images += args[0].shape[0]

        self.handle = self.model.image_encoder.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_encode_supports_shapes_and_absent_labels(transfer, supports_data):
    images, masks = supports_data
    payload = transfer.encode_supports(images, masks, LABELS)
    model = transfer.model
    h = 128 // 16
    assert payload["maskmem_features"].shape == (6, 3, model.mem_dim, h, h)
    assert payload["maskmem_features"].dtype == np.float16
    assert payload["obj_ptr"].shape == (6, 3, model.hidden_dim) and payload["obj_ptr"].dtype == np.float32
    assert payload["object_present"].dtype == bool
    expected = np.array([[True, i < 3, False] for i in range(6)])
    np.testing.assert_array_equal(payload["object_present"], expected)
    # SAM 2.1 encodes "absent" as the learned no-object pointer.
    no_obj_ptr = model.no_obj_ptr.detach().numpy()[0]
    np.testing.assert_allclose(payload["obj_ptr"][0, 2], no_obj_ptr, atol=1e-6)
    assert not np.allclose(payload["obj_ptr"][0, 0], no_obj_ptr)
    # The same label, present vs absent on the same image, gives another memory.
    assert not np.array_equal(payload["maskmem_features"][0, 1], payload["maskmem_features"][4, 1])


def test_segment_volume_shapes_and_allowed_labels(transfer, supports_data):
    images, masks = supports_data
    payload = transfer.encode_supports(images, masks, LABELS)
    plans = make_plans(payload, images, masks, 5, range(4), allowed=(200,), empty={3})
    calls = []
    result = transfer.segment_volume(query_volume(5), plans, LABELS, progress=lambda d, t: calls.append((d, t)))
    assert result.labels == LABELS and len(result.slices) == 5
    assert calls[-1] == (5, 5) and len(calls) == 5
    for z, s in enumerate(result.slices):
        assert s.probabilities.shape == (3, S, S) and s.probabilities.dtype == np.float32
        assert s.object_scores.shape == (3,)
        assert (s.probabilities >= 0).all() and (s.probabilities <= 1).all()
        assert not s.probabilities[1:].any()  # 500 and 600 are not allowed anywhere
        assert (s.object_scores[1:] < -100).all()
        # Slice 3's plan allows nothing, but the slice before it in the propagation predicted 200
        # present, so 200 runs there too (as every object runs on every frame in SAM 2's tracker).
        assert s.ran == (200,)
        assert s.probabilities[0].max() > 0.5  # presence is forced: the mask decoder's output shows
        assert set(s.seconds) == {"encode", "attention_decode", "memory_encode"}
    assert result.seconds["encode"] > 0


@pytest.mark.parametrize("bias", [10.0, -10.0])
def test_a_label_the_neighbour_holds_runs_without_a_support_holding_it(checkpoint, supports_data, bias):
    """Slice 3's supports hold only 200; slice 2, just before it in the propagation, ran 500. If the
    object-score head found 500 present on slice 2, it runs on slice 3 as well, and no made-up
    "absent" memory stands in for it; if it found 500 absent, slice 3 does not run it."""
    t = transfer_with_object_bias(checkpoint, bias)
    images, masks = supports_data
    payload = t.encode_supports(images, masks, LABELS)
    plans = make_plans(payload, images, masks, 5, range(4), scores=[0.1, 0.2, 0.9, 0.3, 0.2])  # anchor 2
    only_200 = make_plans(payload, images, masks, 5, range(3, 6), allowed=(200,))  # supports 3-5 lack 500
    plans[3] = only_200[3]
    assert all(500 not in s.labels for s in plans[3].supports)
    result = t.segment_volume(query_volume(5), plans, LABELS)
    slice2, slice3 = result.slices[2], result.slices[3]
    assert 500 in slice2.ran
    if bias > 0:
        assert slice2.object_scores[1] > 0 and slice3.ran == (200, 500)
        assert slice3.object_scores[1] > 0 and slice3.probabilities[1].max() > 0.5
    else:
        assert slice2.object_scores[1] <= 0 and slice3.ran == (200,)
        assert slice3.object_scores[1] < -100 and not slice3.probabilities[1].any()


def test_object_absent_gives_zero_probability(checkpoint, supports_data):
    absent = transfer_with_object_bias(checkpoint, -10.0)
    images, masks = supports_data
    payload = absent.encode_supports(images, masks, LABELS)
    result = absent.segment_volume(query_volume(3), make_plans(payload, images, masks, 3, range(4)), LABELS)
    for s in result.slices:
        assert (s.object_scores[:2] <= 0).all()
        assert not s.probabilities.any()


def test_support_masks_condition_the_output(transfer, supports_data):
    images, masks = supports_data
    query = query_volume(3)

    def run(support_masks):
        payload = transfer.encode_supports(images, support_masks, LABELS)
        plans = make_plans(payload, images, support_masks, 3, range(4))
        return transfer.segment_volume(query, plans, LABELS)

    first, again = run(masks), run(masks)
    for a, b in zip(first.slices, again.slices):
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        np.testing.assert_array_equal(a.object_scores, b.object_scores)

    moved = masks.copy()
    moved[moved == 200] = 0
    moved[:, 50:90, 5:40] = 200
    emptied = masks.copy()
    emptied[emptied == 500] = 0
    emptied[0, 60:80, 55:85] = 500  # keep one support with 500 so the label stays allowed
    # Random weights condition weakly, but deterministically: any change is the memories' doing.
    for changed, label in ((run(moved), 0), (run(emptied), 1)):
        for a, b in zip(first.slices, changed.slices):
            assert np.abs(a.probabilities[label] - b.probabilities[label]).max() > 1e-5
            assert a.object_scores[label] != b.object_scores[label]
            # labels are independent objects in one batch: the other label's output is untouched
            np.testing.assert_array_equal(a.probabilities[1 - label], b.probabilities[1 - label])


def test_memory_assembly_matches_sam2(transfer, supports_data):
    """Our memory assembly equals SAM2Base._prepare_memory_conditioned_features on the equivalent
    video: the support as a conditioning frame at the query's index, two predicted frames before it."""
    from fewshot.transfer.sam2_memory import Memory

    model = transfer.model
    images, masks = supports_data
    mem = transfer._encode_support_tensors(images[:3], masks[:3], LABELS)
    with torch.inference_mode():
        fpn = transfer._forward_image(transfer.prepare_images(query_volume(1)))
        feats, pos, sizes = transfer._flatten_features(fpn, len(LABELS))
        maskmem_pos = [transfer._maskmem_pos(8, 8).expand(len(LABELS), -1, -1, -1)]

        def frame(i):
            return {"maskmem_features": mem.maskmem_features[i], "maskmem_pos_enc": maskmem_pos, "obj_ptr": mem.obj_ptr[i]}

        frame_idx, num_frames = 5, 9
        output_dict = {"cond_frame_outputs": {frame_idx: frame(0)}, "non_cond_frame_outputs": {4: frame(1), 3: frame(2)}}
        expected = model._prepare_memory_conditioned_features(
            frame_idx, False, feats[-1:], pos[-1:], sizes[-1:], output_dict, num_frames
        )
        ours = transfer._condition_on_memories(
            feats, pos, sizes,
            [
                Memory(mem.maskmem_features[0], mem.obj_ptr[0], t_pos=0, ptr_tpos=0),
                Memory(mem.maskmem_features[1], mem.obj_ptr[1], t_pos=model.num_maskmem - 1, ptr_tpos=1),
                Memory(mem.maskmem_features[2], mem.obj_ptr[2], t_pos=model.num_maskmem - 2, ptr_tpos=2),
            ],
            num_frames,
        )
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_cached_memories_skip_support_encoding(transfer, supports_data):
    images, masks = supports_data
    images16 = np.concatenate([images, images[::-1], images[:4]])
    masks16 = np.concatenate([masks, masks[::-1], masks[:4]])
    payload = transfer.encode_supports(images16, masks16, LABELS)
    plans = make_plans(payload, images16, masks16, 4, range(16), empty={2})
    query = query_volume(4, seed=7)
    with EncoderCounter(transfer.model) as counter:
        first = transfer.segment_volume(query, plans, LABELS, cache_key="volume-a")
    # Once per query slice (slice 2 allows nothing but runs the labels slice 1 found present),
    # never on supports.
    assert counter.images == 4 and counter.calls == 4
    with EncoderCounter(transfer.model) as counter:
        second = transfer.segment_volume(query, plans, LABELS, cache_key="volume-a")
    assert counter.images == 0
    assert second.seconds["encode"] == 0.0
    for a, b in zip(first.slices, second.slices):
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
    # Same key, other pixels on slice 0: that slice is encoded again, not served stale.
    changed = query.copy()
    changed[0] = 1.0 - changed[0]
    with EncoderCounter(transfer.model) as counter:
        transfer.segment_volume(changed, plans, LABELS, cache_key="volume-a")
    assert counter.images == 1


def test_feature_cache_is_lru_over_volumes(checkpoint, supports_data):
    transfer = transfer_with_object_bias(checkpoint, None, feature_cache=2)
    images, masks = supports_data
    payload = transfer.encode_supports(images, masks, LABELS)
    plans = make_plans(payload, images, masks, 2, range(2))
    volumes = {key: query_volume(2, seed=i) for i, key in enumerate("abc")}
    for key in "abc":
        transfer.segment_volume(volumes[key], plans, LABELS, cache_key=key)
    with EncoderCounter(transfer.model) as counter:
        transfer.segment_volume(volumes["c"], plans, LABELS, cache_key="c")
        transfer.segment_volume(volumes["b"], plans, LABELS, cache_key="b")
    assert counter.images == 0
    with EncoderCounter(transfer.model) as counter:
        transfer.segment_volume(volumes["a"], plans, LABELS, cache_key="a")  # evicted
    assert counter.images == 2


def test_propagation_uses_neighbour_memories(checkpoint, supports_data):
    images, masks = supports_data
    scores = [0.1, 0.2, 0.9, 0.3, 0.2]
    results = {}
    for neighbours in (0, 2):
        t = transfer_with_object_bias(checkpoint, 10.0, neighbours=neighbours)
        payload = t.encode_supports(images, masks, LABELS)
        plans = make_plans(payload, images, masks, 5, range(3), scores=scores)
        results[neighbours] = t.segment_volume(query_volume(5), plans, LABELS)
    anchor = 2
    np.testing.assert_array_equal(results[0].slices[anchor].probabilities, results[2].slices[anchor].probabilities)
    for z in (0, 1, 3, 4):
        assert not np.array_equal(results[0].slices[z].probabilities, results[2].slices[z].probabilities)
    assert results[0].seconds["memory_encode"] == 0.0 and results[2].seconds["memory_encode"] > 0


def test_propagation_order_starts_at_best_support():
    def plan(z, score, labels=(1,)):
        return SlicePlan(z, [Support(SupportRef("x", 0), None, None, (1,), score=score)], labels)

    plans = [plan(0, 0.2), plan(1, 0.5), plan(2, 0.99, labels=()), plan(3, 0.7), plan(4, 0.1)]
    anchor, order = propagation_order(plans)
    assert anchor == 3  # slice 2 scores higher but has no allowed label
    assert order == [(3, 1), (4, 1), (2, -1), (1, -1), (0, -1)]
    assert propagation_order([plan(0, 0.3, labels=())]) == (None, [(0, 1)])


def test_reencoding_matches_cached_memories(transfer, supports_data):
    images, masks = supports_data
    query = query_volume(1, seed=3)
    payload = transfer.encode_supports(images[:4], masks[:4], LABELS)
    cached = transfer.segment_volume(query, make_plans(payload, images, masks, 1, range(4)), LABELS)
    with EncoderCounter(transfer.model) as counter:
        reencoded = transfer.segment_slice_reencoding(query[0], images[:4], masks[:4], LABELS)
    assert counter.images == 5  # four supports and the query
    np.testing.assert_array_equal(reencoded.probabilities, cached.slices[0].probabilities)
    np.testing.assert_array_equal(reencoded.object_scores, cached.slices[0].object_scores)


def test_payload_for_labels_reorders_bank_arrays(transfer, supports_data):
    images, masks = supports_data
    payload = transfer.encode_supports(images[:1], masks[:1], LABELS)
    entry = {k: v[0] for k, v in payload.items()}
    picked = payload_for_labels(entry, LABELS, (500, 200))
    np.testing.assert_array_equal(picked["maskmem_features"][0], entry["maskmem_features"][1])
    np.testing.assert_array_equal(picked["obj_ptr"][1], entry["obj_ptr"][0])
    with pytest.raises(KeyError, match="700"):
        payload_for_labels(entry, LABELS, (700,))


def test_wrongly_sliced_payload_is_rejected(transfer, supports_data):
    images, masks = supports_data
    payload = transfer.encode_supports(images[:2], masks[:2], LABELS)
    plans = make_plans(payload, images, masks, 1, range(2))
    with pytest.raises(ValueError, match="labels"):
        transfer.segment_volume(query_volume(1), plans, (200, 500))


def test_checkpoint_round_trip_and_fingerprint(checkpoint, tmp_path):
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    model = build_sam2_model(TINY_CONFIG, checkpoint, "cpu", 128)
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    other = save_random_checkpoint(TINY_CONFIG, tmp_path / "other.pt", seed=1)
    fingerprints = {
        Sam2Transfer.from_settings(SETTINGS, path, TINY_CONFIG, "cpu", "sam2-random-tiny").fingerprint()
        for path in (checkpoint, other)
    }
    assert len(fingerprints) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_with_wrong_keys_raises(checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    renamed = dict(state)
    renamed["no_mem_embed_renamed"] = renamed.pop("no_mem_embed")
    torch.save({"model": renamed}, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointMismatchError, match="missing keys: no_mem_embed.*unexpected keys: no_mem_embed_renamed"):
        build_sam2_model(TINY_CONFIG, tmp_path / "renamed.pt", "cpu", 128)
    reshaped = dict(state)
    reshaped["no_mem_embed"] = torch.zeros(1, 1, 7)
    torch.save({"model": reshaped}, tmp_path / "reshaped.pt")
    with pytest.raises(CheckpointMismatchError, match="other shapes: no_mem_embed"):
        build_sam2_model(TINY_CONFIG, tmp_path / "reshaped.pt", "cpu", 128)
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointMismatchError, match="no 'model'"):
        build_sam2_model(TINY_CONFIG, tmp_path / "bare.pt", "cpu", 128)


def test_image_size_auto_follows_the_device():
    """SAM 2.1 was trained at 1024: that is the default on CUDA; a CPU server takes 512 for time."""
    from fewshot.config import load_preset
    from fewshot.transfer.sam2_model import resolve_image_size

    assert load_preset("foundation")["transfer"]["image_size"] == "auto"
    assert resolve_image_size("auto", "cuda") == resolve_image_size(None, "cuda:1") == 1024
    assert resolve_image_size("auto", "cpu") == 512
    assert resolve_image_size(384, "cuda") == 384
    assert resolve_image_size({"cuda": 768, "cpu": 256}, "cpu") == 256
    with pytest.raises(ValueError, match="no entry for device kind 'cuda'"):
        resolve_image_size({"cpu": 256}, "cuda")
    with pytest.raises(ValueError, match="auto, a number"):
        resolve_image_size("big", "cpu")


def test_image_size_must_fit_the_backbone():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam2_model(TINY_CONFIG, None, "cpu", 100)


def test_real_hiera_tiny_architecture_at_512(tmp_path):
    path = save_random_checkpoint(HIERA_TINY_CONFIG, tmp_path / "hiera_t_random.pt")
    model = build_sam2_model(HIERA_TINY_CONFIG, path, "cpu", 512)
    assert model.image_size == 512 and model.sam_image_embedding_size == 32
    with torch.inference_mode():
        out = model.forward_image(torch.zeros(1, 3, 512, 512))
    assert out["backbone_fpn"][-1].shape == (1, 256, 32, 32)
    assert model.memory_attention.layers[0].cross_attn_image.freqs_cis.shape[0] == 32 * 32


def test_supports_sit_at_distinct_positions_before_the_query(transfer, supports_data):
    """As conditioning frames of a video: the best support nearest, each at its own pointer distance,
    and farther than every query slice already propagated (`step` slices from the anchor)."""
    images, masks = supports_data
    payload = transfer.encode_supports(images[:4], masks[:4], LABELS)
    plan = make_plans(payload, images, masks, 1, range(4))[0]
    hw = (transfer.image_size // transfer.model.backbone_stride,) * 2
    index = np.arange(len(LABELS))
    for step in (0, 3):
        memories = transfer._support_memories(plan.supports, index, len(LABELS), hw, step)
        assert [m.ptr_tpos for m in memories] == [step + 1, step + 2, step + 3, step + 4]
        assert all(m.t_pos == 0 for m in memories)  # spatial memories: conditioning frames, as in SAM 2
    legacy = Sam2Transfer(transfer.model, {**SETTINGS, "support_positions": "query"}, "sam2-random-tiny")
    assert [m.ptr_tpos for m in legacy._support_memories(plan.supports, index, len(LABELS), hw, 3)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="support_positions"):
        Sam2Transfer(transfer.model, {**SETTINGS, "support_positions": "middle"}, "sam2-random-tiny")


def test_older_slices_lend_their_pointers_beyond_the_spatial_memories(checkpoint, supports_data):
    """neighbours=1, pointers=3: slices 2 and 3 back contribute object pointers only (SAM 2 reads up
    to 15 frames' pointers but 6 frames' spatial memories); their features are never encoded twice."""
    images, masks = supports_data
    scores = [0.9, 0.1, 0.1, 0.1, 0.1]  # anchor 0: one upward pass
    out = {}
    for pointers in (1, 3):
        t = transfer_with_object_bias(checkpoint, 10.0, neighbours=1, pointers=pointers)
        assert t.pointers == pointers
        payload = t.encode_supports(images, masks, LABELS)
        out[pointers] = t.segment_volume(query_volume(5), make_plans(payload, images, masks, 5, range(3), scores=scores), LABELS)
    for z in (0, 1):  # at most one slice back: nothing differs
        np.testing.assert_array_equal(out[1].slices[z].probabilities, out[3].slices[z].probabilities)
    for z in (2, 3, 4):
        assert not np.array_equal(out[1].slices[z].probabilities, out[3].slices[z].probabilities)
    assert out[1].seconds["memory_encode"] > 0


def test_fill_holes_as_sam2_video_predictor():
    """sam2.utils.misc.fill_holes_in_mask_scores: background components of at most max_area
    low-res pixels (8-connected) become 0.1; larger ones stay."""
    from fewshot.transfer.sam2_memory import fill_holes

    logits = torch.full((2, 1, 16, 16), 5.0)
    logits[0, 0, 4:6, 4:6] = -3.0  # a 4-pixel hole
    logits[0, 0, 9:13, 9:13] = -3.0  # a 16-pixel hole
    logits[1] = -2.0  # an empty mask: its background is one large component
    filled = fill_holes(logits, 8)
    assert (filled[0, 0, 4:6, 4:6] == 0.1).all()
    assert (filled[0, 0, 9:13, 9:13] == -3.0).all()
    torch.testing.assert_close(filled[1], logits[1])
    assert fill_holes(logits, 0) is logits or torch.equal(fill_holes(logits, 0), logits)


def test_bf16_autocast_is_device_agnostic_and_close_to_float32(checkpoint, supports_data):
    """The CUDA path's bfloat16 autocast, proven on CPU: it runs, it really is bfloat16 (the output
    moves), it stays within bfloat16's precision of float32, and outputs leave as float32. "auto"
    turns it on for CUDA only."""
    images, masks = supports_data
    exact = transfer_with_object_bias(checkpoint, 10.0)
    bf16 = transfer_with_object_bias(checkpoint, 10.0, autocast="bf16")
    assert not exact.autocast and bf16.autocast
    with pytest.raises(ValueError, match="autocast"):
        transfer_with_object_bias(checkpoint, None, autocast="fp8")
    out = {}
    for name, t in (("exact", exact), ("bf16", bf16)):
        payload = t.encode_supports(images, masks, LABELS)
        out[name] = (payload, t.segment_volume(query_volume(4), make_plans(payload, images, masks, 4, range(4)), LABELS))
    (p32, r32), (p16, r16) = out["exact"], out["bf16"]
    feats32, feats16 = p32["maskmem_features"].astype(np.float32), p16["maskmem_features"].astype(np.float32)
    assert 0 < np.abs(feats32 - feats16).max() < 0.05 * np.abs(feats32).max()
    for a, b in zip(r32.slices, r16.slices):
        assert b.probabilities.dtype == np.float32
        assert 0 < np.abs(a.probabilities - b.probabilities).max() < 0.05


def test_a_label_left_unannotated_never_becomes_an_absent_memory(transfer, supports_data):
    """Support 3 holds 200 but not 500. Annotated for both, its 500 memory says "absent" and weighs
    on label 500; with 500 left unannotated (``label_annotated`` False) its 500 memory is never read:
    replacing it with noise changes nothing for 500, while label 200 still reads support 3."""
    images, masks = supports_data
    payload = transfer.encode_supports(images, masks, LABELS)
    query = query_volume(3)

    def run(annotated_500: bool, noise: bool):
        p = {k: v.copy() for k, v in payload.items()}
        p["label_annotated"] = np.ones((6, 3), bool)
        p["label_annotated"][3, 1] = annotated_500
        if noise:  # support 3's memories of both labels replaced
            rng = np.random.default_rng(5)
            p["maskmem_features"][3] = rng.normal(size=p["maskmem_features"][3].shape).astype(np.float16)
            p["obj_ptr"][3] = rng.normal(size=p["obj_ptr"][3].shape).astype(np.float32)
        plans = make_plans(p, images, masks, 3, [0, 3])
        for plan in plans:
            for s, i in zip(plan.supports, [0, 3]):
                s.payload["label_annotated"] = p["label_annotated"][i]
        result = transfer.segment_volume(query, plans, LABELS)
        return np.stack([s.probabilities for s in result.slices])

    left_out, left_out_noise = run(False, False), run(False, True)
    np.testing.assert_array_equal(left_out[:, 1], left_out_noise[:, 1])  # 500: support 3 unread
    assert not np.allclose(left_out[:, 0], left_out_noise[:, 0], atol=1e-4)  # 200: support 3 read
    annotated, annotated_noise = run(True, False), run(True, True)
    assert not np.allclose(annotated[:, 1], annotated_noise[:, 1], atol=1e-4)  # the check can fail
    assert not np.allclose(annotated[:, 1], left_out[:, 1], atol=1e-4)  # its "absent" memory did weigh


def test_a_label_no_support_speaks_for_and_no_neighbour_holds_does_not_run(transfer, supports_data):
    images, masks = supports_data
    payload = {k: v.copy() for k, v in transfer.encode_supports(images, masks, LABELS).items()}
    payload["label_annotated"] = np.ones((6, 3), bool)
    payload["label_annotated"][:, 2] = False  # 600 annotated nowhere
    plans = make_plans(payload, images, masks, 2, [0, 3], allowed=(200,))
    for plan in plans:
        for s, i in zip(plan.supports, [0, 3]):
            s.payload["label_annotated"] = payload["label_annotated"][i]
    tracked = Sam2Transfer(transfer.model, {**SETTINGS, "track_all_labels": True}, "sam2-random-tiny")
    result = tracked.segment_volume(query_volume(2), plans, LABELS)
    assert all(s.ran == (200, 500) for s in result.slices)  # every label but the one nobody annotated
    assert all(not s.probabilities[2].any() for s in result.slices)


def keyed(plans, keys_by_slice):
    """Bank keys on the plans' supports, as SupportBank.support sets them."""
    for plan in plans:
        for rank, s in enumerate(plan.supports):
            s.key = keys_by_slice.get(plan.slice_index, {}).get(rank, f"s{s.ref.slice_index}")
    return plans


@pytest.mark.parametrize("changed_slice, rerun", [
    (6, {6, 7}),  # above the anchor (2): it and the slices after it
    # within `pointers` (2) of the anchor: the downward pass reads it, so 1 and then 0 re-run too
    (3, {0, 1, 3, 4, 5, 6, 7}),
    (0, {0}),  # the last slice of the downward pass: nothing reads it
])
def test_a_run_after_a_bank_change_reruns_exactly_the_slices_that_depend_on_it(checkpoint, supports_data, changed_slice, rerun):
    images, masks = supports_data
    payload = transfer_with_object_bias(checkpoint, 10.0).encode_supports(images, masks, LABELS)
    query = query_volume(8)
    scores = [0.1, 0.2, 0.9, 0.3, 0.3, 0.2, 0.2, 0.1]  # anchor: slice 2

    def plans(change: bool):
        p = keyed(make_plans(payload, images, masks, 8, [0, 3], scores=scores), {})
        if change:  # a new bank entry replaced the second support of one slice
            p[changed_slice] = keyed(make_plans(payload, images, masks, 8, [0, 4], scores=scores), {changed_slice: {1: "new/0"}})[changed_slice]
        return p

    cached = transfer_with_object_bias(checkpoint, 10.0, propagation_cache=2)
    first = cached.segment_volume(query, plans(False), LABELS, cache_key="volume")
    assert not any(s.reused for s in first.slices)
    again = cached.segment_volume(query, plans(True), LABELS, cache_key="volume")
    assert {z for z, s in enumerate(again.slices) if not s.reused} == rerun
    # Exactly what a fresh transfer computes from scratch on the new plans.
    fresh = transfer_with_object_bias(checkpoint, 10.0).segment_volume(query, plans(True), LABELS)
    for z, (a, b) in enumerate(zip(again.slices, fresh.slices)):
        np.testing.assert_array_equal(a.probabilities, b.probabilities, err_msg=f"slice {z}")
        np.testing.assert_array_equal(a.object_scores, b.object_scores, err_msg=f"slice {z}")
        assert a.ran == b.ran
    # The check can fail: the previous run's slices differ from the new ones where supports changed.
    assert not np.array_equal(first.slices[changed_slice].probabilities, fresh.slices[changed_slice].probabilities)


def test_a_new_anchor_or_other_labels_rerun_everything(checkpoint, supports_data):
    images, masks = supports_data
    cached = transfer_with_object_bias(checkpoint, 10.0, propagation_cache=2)
    payload = cached.encode_supports(images, masks, LABELS)
    query = query_volume(5)
    plans = lambda scores: keyed(make_plans(payload, images, masks, 5, [0, 3], scores=scores), {})
    cached.segment_volume(query, plans([0.1, 0.9, 0.2, 0.2, 0.1]), LABELS, cache_key="volume")
    same = cached.segment_volume(query, plans([0.1, 0.9, 0.2, 0.2, 0.1]), LABELS, cache_key="volume")
    assert all(s.reused for s in same.slices)
    moved = cached.segment_volume(query, plans([0.1, 0.2, 0.2, 0.9, 0.1]), LABELS, cache_key="volume")
    assert not any(s.reused for s in moved.slices)
    two = {k: v[:, :2] for k, v in payload.items()}
    fewer = keyed(make_plans(two, images, masks, 5, [0, 3], scores=[0.1, 0.2, 0.2, 0.9, 0.1]), {})
    fewer = cached.segment_volume(query, fewer, (200, 500), cache_key="volume")
    assert not any(s.reused for s in fewer.slices)
    unkeyed = make_plans(payload, images, masks, 5, [0, 3], scores=[0.1, 0.2, 0.2, 0.9, 0.1])
    assert not any(s.reused for s in cached.segment_volume(query, unkeyed, LABELS, cache_key="volume").slices)
