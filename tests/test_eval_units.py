"""Unit tests of the evaluation package's pure parts: metrics, protocol bookkeeping, plots."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fewshot import plots
from fewshot.eval import metrics, protocols
from fewshot.eval.metrics import CaseLabelScore, dice, hd95, surface_distances

# --------------------------------------------------------------------------------------- metrics


def square(shape=(32, 32), top=10, left=10, size=10) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top:top + size, left:left + size] = True
    return m


def test_identical_masks_score_perfectly():
    m = square()
    assert dice(m, m) == 1.0
    assert hd95(m, m, (2.0, 1.0)) == 0.0


def test_disjoint_masks_have_zero_dice():
    a, b = square(left=0, size=5), square(left=20, size=5)
    assert dice(a, b) == 0.0
    # nearest surfaces: column 4 vs column 20 -> 16 px at 1 mm; farthest corner pairs add more
    assert hd95(a, b, (1.0, 1.0)) >= 16.0


def test_empty_conventions():
    empty, full = np.zeros((8, 8), bool), square((8, 8), 2, 2, 3)
    assert dice(empty, empty) == 1.0
    assert math.isnan(dice(empty, empty, both_empty=float("nan")))
    assert dice(empty, full) == 0.0
    assert hd95(empty, empty, (1.0, 1.0)) == 0.0
    assert math.isnan(hd95(empty, full, (1.0, 1.0)))
    assert math.isnan(hd95(full, empty, (1.0, 1.0)))


def test_offset_squares_worked_by_hand():
    # A = rows 10..19 x cols 10..19, B = the same square 3 columns to the right (cols 13..22).
    # Overlap 10 x 7 = 70 px -> Dice = 2*70 / (100+100) = 0.7.
    # Surface distances A->B with spacing (2 mm rows, 1 mm cols), 36 surface pixels of A:
    #   top/bottom rows: cols 13..19 lie on B's top/bottom row -> 0 (14 px); cols 10,11,12 -> 3,2,1 mm
    #   left column (rows 11..18): nearest is B's left column 3 px away -> 3 mm (8 px)
    #   right column (rows 11..18, inside B): B's right column 3 mm away, or B's top/bottom row at
    #   2 mm per row: rows 11 and 18 -> 2 mm, rows 12..17 -> 3 mm
    #   => {0: 14, 1: 2, 2: 4, 3: 16}; B->A is the mirror image, so the pooled counts double.
    # 95th percentile of the 72 pooled values: positions 67 and 68 of the sorted list are both 3 -> 3 mm.
    a, b = square(), square(left=13)
    assert dice(a, b) == pytest.approx(0.7)
    d = surface_distances(a, b, (2.0, 1.0))
    assert Counter(np.round(d, 6).tolist()) == {0.0: 28, 1.0: 4, 2.0: 8, 3.0: 32}
    assert hd95(a, b, (2.0, 1.0)) == pytest.approx(3.0)
    # Isotropic 1 mm: right-column rows 11/18 -> 1 mm, 12/17 -> 2 mm, 13..16 -> 3 mm, so per direction
    # {0: 14, 1: 4, 2: 4, 3: 14}: the row spacing changed the distribution, as it must.
    d_iso = surface_distances(a, b, (1.0, 1.0))
    assert Counter(np.round(d_iso, 6).tolist()) == {0.0: 28, 1.0: 8, 2.0: 8, 3.0: 28}


def test_anisotropic_spacing_is_honoured():
    a = square()
    along_rows, along_cols = square(top=13), square(left=13)
    assert hd95(a, along_cols, (2.0, 1.0)) == pytest.approx(3.0)
    assert hd95(a, along_rows, (2.0, 1.0)) == pytest.approx(6.0)  # 3 rows x 2 mm
    one, other = np.zeros((4, 6, 6), bool), np.zeros((4, 6, 6), bool)
    one[0, 2, 2], other[1, 2, 2] = True, True
    assert hd95(one, other, (5.0, 1.0, 1.0)) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        hd95(one, other, (1.0, 1.0))


def _brute_force_hd95(p: np.ndarray, t: np.ndarray, spacing) -> float:
    """Independent reference: surface by explicit neighbour test, distances by all pairs."""
    def surface_points(m):
        padded = np.pad(m, 1)
        inner = np.ones_like(m)
        for ax in range(m.ndim):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis=ax)[tuple(slice(1, -1) for _ in range(m.ndim))]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    sp, st = surface_points(p), surface_points(t)
    d = cdist(sp, st)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


@pytest.mark.parametrize("ndim,spacing", [(2, (1.7, 0.6)), (3, (4.0, 1.25, 1.25))])
def test_hd95_matches_brute_force_on_random_blobs(ndim, spacing):
    from scipy import ndimage

    rng = np.random.default_rng(ndim)
    shape = (40, 40) if ndim == 2 else (12, 24, 24)
    for _ in range(3):
        p = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 2) > 0.5)
        t = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 2) > 0.5)
        assert p.any() and t.any()
        assert hd95(p, t, spacing) == pytest.approx(_brute_force_hd95(p, t, spacing), abs=1e-9)


# ------------------------------------------------------------------------------------- protocols

CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20",
             "21", "22", "31", "32", "33", "34", "36", "37", "38", "39"]


def test_alpnet_folds_on_chaos_ids():
    rng = np.random.default_rng(0)
    shuffled = [f"image_{i}" for i in rng.permutation(CHAOS_IDS)]
    folds = protocols.alpnet_folds(shuffled, n_folds=5)
    assert [f.index for f in folds] == [0, 1, 2, 3, 4]
    # SSL-ALPNet: numeric sort, groups of 4, support = the scan after the group (circular).
    assert folds[0].query_ids == ("image_1", "image_2", "image_3", "image_5")
    assert folds[0].support_id == "image_8"
    assert folds[4].query_ids == ("image_36", "image_37", "image_38", "image_39")
    assert folds[4].support_id == "image_1"
    queried = Counter(q for f in folds for q in f.query_ids)
    assert set(queried) == set(shuffled) and set(queried.values()) == {1}
    assert [f.support_id for f in folds] == ["image_8", "image_19", "image_31", "image_36", "image_1"]
    for f in folds:
        assert f.support_id not in f.query_ids


def test_adnet_convention_differs_only_in_last_fold():
    cmr = [str(i) for i in range(1, 36)]  # 35 CMR scans: ADNet's get_folds uses groups of 7
    alp = protocols.alpnet_folds(cmr, 5)
    adn = protocols.alpnet_folds(cmr, 5, convention="adnet")
    assert alp[:4] == adn[:4]
    assert alp[0].query_ids == tuple(str(i) for i in range(1, 8)) and alp[0].support_id == "8"
    # ADNet FOLD[4] = indices {0, 28..34}; sorted, the last (scan "35") is the support.
    assert adn[4].support_id == "35"
    assert adn[4].query_ids == ("1",) + tuple(str(i) for i in range(29, 35))
    assert alp[4].support_id == "1" and alp[4].query_ids == tuple(str(i) for i in range(29, 36))
    for f in adn:
        assert f.support_id not in f.query_ids


def test_folds_for_uneven_counts_and_bad_inputs():
    folds = protocols.alpnet_folds([f"c{i}" for i in range(7)], n_folds=3)
    assert [len(f.query_ids) for f in folds] == [3, 2, 2]
    assert [f.support_id for f in folds] == ["c3", "c5", "c0"]
    with pytest.raises(ValueError):
        protocols.alpnet_folds(["1", "2", "3"], n_folds=3)
    with pytest.raises(ValueError):
        protocols.alpnet_folds(["1", "1", "2", "3"], n_folds=2)


def test_alpnet_chunks_and_support_slices_worked_example():
    # Organ on slices 10..21 (12 slices). Query rule: chunk = int((z - 10) // (11 / 3)):
    #   z = 10..13 -> (0..3) // 3.67 = 0; z = 14..17 -> (4..7) // 3.67 = 1; z = 18..20 -> 2; z = 21 -> 3, clipped to 2.
    # Support rule: zlist[int(pct * 12)] with pct = 1/6, 1/2, 5/6 -> zlist[2], zlist[6], zlist[10] = 12, 16, 20.
    presence = np.zeros(30, bool)
    presence[10:22] = True
    chunks = protocols.organ_chunks(presence, n_chunks=3)
    assert chunks == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]
    assert protocols.support_slice_per_chunk(chunks) == [12, 16, 20]

    # Organ on slices 5..14 (10 slices): width 9 / 3 = 3 -> [5,6,7], [8,9,10], [11..13] + 14 clipped.
    # Support: int(pct * 10) = 1, 5, 8 -> zlist[1], zlist[5], zlist[8] = 6, 10, 13.
    chunks = protocols.organ_chunks(list(range(5, 15)))
    assert chunks == [[5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    assert protocols.support_slice_per_chunk(chunks) == [6, 10, 13]


def test_query_chunk_assignment_uses_the_query_extent():
    # Query organ on slices 3..9: width 6 / 3 = 2 -> 3,4 -> 0; 5,6 -> 1; 7,8 -> 2; 9 -> 3 clipped to 2.
    q = np.zeros(12, bool)
    q[3:10] = True
    assert protocols.query_chunk_assignment(q) == {3: 0, 4: 0, 5: 1, 6: 1, 7: 2, 8: 2, 9: 2}
    # Over the whole scan, slices outside the extent clip to the first/last chunk.
    everywhere = protocols.query_chunk_assignment(q, n_slices=12)
    assert [everywhere[z] for z in range(12)] == [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert protocols.query_chunk_assignment(np.zeros(5, bool)) == {}


def test_single_slice_and_gapped_organs():
    assert protocols.organ_chunks([7]) == [[7], [], []]
    assert protocols.support_slice_per_chunk([[7], [], []]) == [7, 7, 7]
    assert protocols.query_chunk_assignment([7]) == {7: 0}
    # Gap: slices 2,3,4 and 10,11 -> extent 2..11, width 3 -> the middle chunk is empty.
    gapped = protocols.organ_chunks([2, 3, 4, 10, 11])
    assert gapped == [[2, 3, 4], [], [10, 11]]
    assert protocols.support_slice_per_chunk(gapped) == [2, 4, 11]  # zlist[0], zlist[2], zlist[4]
    with pytest.raises(ValueError):
        protocols.support_slice_per_chunk([[], [], []])


def test_label_presence_and_extent():
    lab = np.zeros((9, 4, 4), np.uint16)
    lab[2, 1, 1] = 600
    lab[5, 0, 0] = 600
    lab[4, 2, 2] = 200
    pres = protocols.label_presence(lab, 600)
    assert pres.tolist() == [False, False, True, False, False, True, False, False, False]
    assert protocols.organ_extent(pres) == [2, 3, 4, 5]
    assert protocols.organ_extent(pres, margin=4) == list(range(0, 9))
    assert protocols.organ_extent(protocols.label_presence(lab, 500)) == []
    assert protocols.label_presence(lab, 200, axis=2).tolist() == [False, False, True, False]


def test_clinical_split_is_seeded_and_disjoint():
    s1, q1 = protocols.clinical_split(CHAOS_IDS, shots=3, seed=7)
    s2, q2 = protocols.clinical_split(list(reversed(CHAOS_IDS)), shots=3, seed=7)
    assert (s1, q1) == (s2, q2)
    assert len(s1) == 3 and not set(s1) & set(q1) and set(s1) | set(q1) == set(CHAOS_IDS)
    draws = {tuple(protocols.clinical_split(CHAOS_IDS, 3, seed)[0]) for seed in range(5)}
    assert len(draws) > 1
    for bad in (0, 20):
        with pytest.raises(ValueError):
            protocols.clinical_split(CHAOS_IDS, bad, 0)


def test_growth_splits_are_nested_with_fixed_queries():
    assert protocols.growth_steps(5) == [1, 2, 4]
    assert protocols.growth_steps(100) == list(protocols.GROWTH_STEPS)
    splits = protocols.growth_splits(CHAOS_IDS, seed=1)
    assert [s.n_labelled for s in splits] == [1, 2, 4, 8]
    queries = splits[0].query_ids
    assert len(queries) == 10  # half the scans: the pool of 10 leaves a choice even at 8 labelled
    assert len(protocols.growth_splits([f"c{i}" for i in range(35)], seed=0)[0].query_ids) == 17
    for prev, cur in zip(splits, splits[1:]):
        assert cur.support_ids[: prev.n_labelled] == prev.support_ids
        assert cur.query_ids == queries
    assert not set(splits[-1].support_ids) & set(queries)
    small = protocols.growth_splits(["a1", "a2", "a3", "a4", "a5"], seed=0)
    assert [s.n_labelled for s in small] == [1, 2, 4] and len(small[0].query_ids) == 1


# ----------------------------------------------------------------------------------------- plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_plots_write_readable_pngs(tmp_path):
    rng = np.random.default_rng(0)
    rows = [CaseLabelScore(case_id=f"case{c}", label=lb, dice=float(rng.uniform(0.5, 0.95)),
                           hd95=float(rng.uniform(2, 20)) if c else math.nan, label_name=name)
            for c in range(6) for lb, name in [(200, "LV myocardium"), (500, "LV blood pool"), (600, "RV")]]
    _assert_png(plots.box_plot_per_label(rows, tmp_path / "box.png", title="CMR, 1-shot"))
    dice_only = [{"case_id": r.case_id, "label": r.label, "dice": r.dice} for r in rows]
    _assert_png(plots.box_plot_per_label(dice_only, tmp_path / "box_dice.png"))

    curves = {"random": [(1, 0.55, 0.1), (2, 0.6, 0.08), (4, 0.66, 0.05), (8, 0.7, 0.04)],
              "diverse": [(1, 0.58, 0.09), (2, 0.65, 0.07), (4, 0.7, 0.05), (8, 0.73, 0.03)]}
    _assert_png(plots.growth_curve(curves, tmp_path / "growth.png"))

    yy, xx = np.mgrid[:64, :64]
    image = (np.sin(xx / 6.0) * np.cos(yy / 9.0) + 1) / 2
    truth = np.zeros((64, 64), np.uint16)
    truth[(yy - 30) ** 2 + (xx - 30) ** 2 < 150] = 500
    truth[(yy - 30) ** 2 + (xx - 30) ** 2 < 40] = 600
    pred = np.roll(truth, 4, axis=1)
    out = plots.overlay_montage([("best: case 3, Dice 0.91", image, truth, truth),
                                 ("worst: case 5, Dice 0.42", image, truth, pred)],
                                tmp_path / "montage.png", label_names={500: "LV blood pool", 600: "RV"})
    _assert_png(out)
    _assert_png(plots.bar_chart({"embed": 0.12, "retrieve": 0.01, "match": 0.4, "transfer": 2.3},
                                "Seconds per slice by stage", "seconds", tmp_path / "bars.png"))
    _assert_png(plots.line_chart({"exact": [(1e3, 0.1), (1e4, 1.0), (1e5, 9.0)],
                                  "hnsw": [(1e3, 0.2), (1e4, 0.3), (1e5, 0.5)]},
                                 "Search time against bank size", "bank entries", "ms per query",
                                 tmp_path / "lines.png", logx=True, logy=True))
    with pytest.raises(ValueError):
        plots.bar_chart({}, "t", "y", tmp_path / "none.png")


# --------------------------------------------------------------------------------------- label maps


def test_label_map_accepts_name_value_and_value_name():
    from fewshot.config import ConfigError, parse_label_map

    expected = {"liver": 1, "right_kidney": 2, "spleen": 4}
    assert parse_label_map("liver=1,right_kidney=2,spleen=4") == expected
    assert parse_label_map("1=liver,2=right_kidney,4=spleen") == expected  # issue 4's spelling
    assert parse_label_map("1=liver, right_kidney=2 ,spleen=4") == expected
    assert parse_label_map({"LV-MYO": 200}) == parse_label_map({200: "LV-MYO"}) == {"LV-MYO": 200}
    for bad, why in [("1=2", "two integers"), ("liver=kidney", "no integer"), ("liver=0", "positive"),
                     ("0=liver", "positive"), ("liver", "name=value"), ("liver=1,liver=2", "two values")]:
        with pytest.raises(ConfigError, match=why):
            parse_label_map(bad)


# --------------------------------------------------------------------------------------- HD95 of missed organs


def _case(cid, hd, pred_vox, ref_vox, diag=100.0, d=0.5):
    from fewshot.eval import results as res

    return res.CaseResult(cid, 0, ("s",), {1: metrics.LabelScore(d, hd)}, {1: 4}, {1: ref_vox}, {1: pred_vox},
                             seconds=1.0, query_slices=4, organ_slices=4, diagonal_mm=diag)


def test_missed_organ_is_counted_and_can_be_penalised():
    from fewshot.eval import results as res

    results = [_case("a", 2.0, 5, 5), _case("b", math.nan, 0, 5, d=0.0), _case("c", math.nan, 7, 0, d=0.0, diag=80.0)]
    s = res.summarise(results, {1: "liver"})["per_label"]["liver"]
    # Default: undefined HD95s stay out of the mean, and how many there were is said beside it.
    assert s["hd95_mean"] == pytest.approx(2.0) and s["hd95_n"] == 1
    assert (s["hd95_empty_prediction"], s["hd95_empty_reference"]) == (1, 1)
    penalised = res.summarise(results, {1: "liver"}, hd95_empty="diagonal")
    p = penalised["per_label"]["liver"]
    assert p["hd95_mean"] == pytest.approx((2.0 + 100.0 + 80.0) / 3) and p["hd95_n"] == 3
    assert penalised["hd95_policy"]["name"] == "diagonal"
    rows = res.case_rows(results, {1: "liver"}, "diagonal")
    assert [r["hd95_undefined_because"] for r in rows] == ["", "empty prediction", "empty reference"]
    assert math.isnan(rows[1]["hd95"]) and rows[1]["hd95_in_mean"] == 100.0
    assert math.isnan(res.case_rows(results, {1: "liver"})[1]["hd95_in_mean"])
    with pytest.raises(ValueError, match="HD95 policy"):
        res.summarise(results, {1: "liver"}, hd95_empty="zero")


# --------------------------------------------------------------------------------------- nested selection


def test_nested_selection_on_a_hand_made_table():
    from fewshot.eval import selection

    # Dice per (point, group): point 0 is best on average only thanks to group 0.
    #            g0   g1   g2   mean
    # point 0   0.9  0.5  0.5  0.633
    # point 1   0.1  0.6  0.6  0.433
    table = {(0, 0): 0.9, (0, 1): 0.5, (0, 2): 0.5, (1, 0): 0.1, (1, 1): 0.6, (1, 2): 0.6}
    rows = [(p, g, f"case{g}", 1, d) for (p, g), d in table.items()]
    choice = selection.nested_select(rows)
    # g0 is chosen on g1+g2 (0.5 vs 0.6): point 1, and reported there (0.1). g1 and g2 are chosen on
    # a table that includes g0's 0.9: point 0 (0.7 vs 0.35), reported at 0.5.
    assert {g: c["point"] for g, c in choice.items()} == {0: 1, 1: 0, 2: 0}
    assert choice[0]["score_other_groups"] == pytest.approx(0.6) and choice[0]["score_this_group"] == pytest.approx(0.1)
    assert choice[1]["score_other_groups"] == pytest.approx(0.7) and choice[1]["score_this_group"] == pytest.approx(0.5)
    nested = np.mean([c["score_this_group"] for c in choice.values()])
    assert nested == pytest.approx(1.1 / 3)  # below both points' all-group means: selection is not free
    # Ties go to the earlier point; a group never sees its own scores.
    tie = [(0, 0, "a", 1, 0.5), (1, 0, "a", 1, 0.5), (0, 1, "b", 1, 0.5), (1, 1, "b", 1, 0.5)]
    assert {c["point"] for c in selection.nested_select(tie).values()} == {0}
    with pytest.raises(ValueError, match="two groups"):
        selection.nested_select([(0, 0, "a", 1, 0.5), (1, 0, "a", 1, 0.6)])


def test_selection_score_averages_labels_not_rows():
    from fewshot.eval import selection

    rows = [("a", 1, 1.0), ("b", 1, 1.0), ("a", 2, 0.0), ("b", 2, math.nan)]
    assert selection.selection_score(rows) == pytest.approx(0.5)  # labels weigh equally; nan is left out
    assert math.isnan(selection.selection_score([("a", 1, math.nan)]))


def test_select_grid_parsing_and_clinical_groups():
    from fewshot.config import ConfigError
    from fewshot.eval import selection

    grid = selection.parse_select(["embedder.pca_dims=16,32", "transfer.fusion.h=0.005, 0.05"])
    assert grid == {"embedder.pca_dims": [16, 32], "transfer.fusion.h": [0.005, 0.05]}
    points = selection.grid_points(grid)
    assert len(points) == 4 and points[0] == {"embedder.pca_dims": 16, "transfer.fusion.h": 0.005}
    assert points[1] == {"embedder.pca_dims": 16, "transfer.fusion.h": 0.05}
    assert selection.grid_points({}) == [{}]
    assert selection.parse_select(["transfer.consistency.z_weights=[1],[0.25, 0.5, 0.25]"]) == {
        "transfer.consistency.z_weights": [[1], [0.25, 0.5, 0.25]]}
    for bad in (["pca_dims"], ["a=1,1"], ["a=1", "a=2"], ["=1,2"]):
        with pytest.raises(ConfigError):
            selection.parse_select(bad)
    results = [_case(str(i), 1.0, 1, 1) for i in (1, 2, 3, 10, 11, 12, 13)]
    groups = selection.round_robin_groups(results)
    # Sorted numerically (2 before 10) and dealt round-robin into 5 groups.
    assert [groups[(0, str(i))] for i in (1, 2, 3, 10, 11, 12, 13)] == [0, 1, 2, 3, 4, 0, 1]


def test_implied_extent_inverts_the_support_slice_rule():
    """The extent one support slice per chunk implies is the organ's own, within a slice, for any
    extent and chunk count, and the rule maps it back onto the same slices; it is the organ's exact
    extent in most cases (the linear estimate it replaced: 44 % for three chunks); clipped to the
    scan; a single slice implies only itself."""
    from fewshot.eval import protocols as p

    for n_chunks in (2, 3, 4):
        exact = 0
        cases = [(lo, length) for lo in range(12) for length in range(1, 45)]
        for lo, length in cases:
            presence = np.zeros(60, bool)
            presence[lo:lo + length] = True
            zs = p.support_slice_per_chunk(p.organ_chunks(presence, n_chunks))
            first, last = p.implied_extent(zs, 60)
            assert abs(first - lo) <= 1 and abs(last - (lo + length - 1)) <= 1, (n_chunks, lo, length, zs, first, last)
            implied = np.zeros(60, bool)
            implied[first:last + 1] = True
            assert p.support_slice_per_chunk(p.organ_chunks(implied, n_chunks)) == zs, (n_chunks, lo, length)
            exact += (first, last) == (lo, lo + length - 1)
        assert exact / len(cases) >= {2: 0.5, 3: 0.65, 4: 0.75}[n_chunks], (n_chunks, exact / len(cases))
    assert p.implied_extent([2, 6, 10], 11) == (0, 10)
    assert p.implied_extent([7], 20) == (7, 7) and p.implied_extent([5, 5, 5], 20) == (5, 5)
    with pytest.raises(ValueError):
        p.implied_extent([], 10)
    # Of several extents the rule maps onto the same slices, the middle length's (found by brute force).
    several = 0
    for zs in ([3, 9, 15], [10, 14, 18], [4, 11], [2, 5, 8, 11]):
        fits = []
        for lo in range(0, 40):
            for length in range(1, 41 - lo):
                presence = np.zeros(40, bool)
                presence[lo:lo + length] = True
                if p.support_slice_per_chunk(p.organ_chunks(presence, len(zs))) == zs:
                    fits.append((lo, lo + length - 1))
        fits.sort(key=lambda e: e[1] - e[0])  # one extent per length at most: the middle length's
        assert fits and p.implied_extent(zs, 40) == fits[len(fits) // 2], (zs, fits)
        several += len(fits) >= 3
    assert several >= 2  # the choice among candidates is exercised
    # An organ with a gap (slices 10-13 and 20-31): no gap-free extent yields its slices; the linear
    # estimate, half a chunk beyond the outer slices (17 * 3 / 2 / 6 = 4.25 slices), clipped to the scan.
    gapped = np.zeros(40, bool)
    gapped[10:14] = gapped[20:32] = True
    zs = p.support_slice_per_chunk(p.organ_chunks(gapped, 3))
    assert zs == [12, 24, 29] and p.implied_extent(zs, 40) == (8, 33) and p.implied_extent(zs, 32) == (8, 31)


def test_a_support_slice_given_mask_beats_another_organ_carried_onto_it():
    """Two organs carried through one scan: on a slice where the protocol gives organ 500, organ 200's
    carried mask reaches probability 1 too; the given mask must keep its voxels (a tie's argmax would
    hand them to the lower label value), and off the given slices the carried organs are untouched."""
    from fewshot.decision import LabelDecision
    from fewshot.eval.alpnet import given_masks_win

    probs = np.zeros((5, 2, 8, 8), np.float32)
    given_500 = np.zeros((8, 8), bool)
    given_500[2:6, 2:6] = True
    probs[2, 1][given_500] = 1.0  # organ 500 given on slice 2
    probs[:, 0, 1:5, 1:5] = 1.0  # organ 200 carried over slices 0-4, overlapping it
    out = given_masks_win(probs, [{}, {2: given_500}])
    decided = LabelDecision().decide(out.transpose(1, 0, 2, 3))  # (organ, z, y, x) -> channel per voxel
    assert (decided[2][given_500] == 1).all()
    assert (decided[2][1:5, 1:5][~given_500[1:5, 1:5]] == 0).all()  # organ 200 keeps the rest of slice 2
    assert np.array_equal(out[[0, 1, 3, 4]], probs[[0, 1, 3, 4]]) and out is not probs
    assert (LabelDecision().decide(probs.transpose(1, 0, 2, 3))[2][given_500] == 0).any()  # the tie it fixes


def test_propagated_alpnet_support_needs_a_registration_preset():
    from fewshot.eval.alpnet import carrier

    class Sam2Like:  # no 2D registration to carry slices with
        pass

    with pytest.raises(ValueError, match="registration preset"):
        carrier(Sam2Like())


def test_select_refuses_too_few_query_scans_before_anything_runs():
    """Nested selection needs two groups of query scans: a request that leaves one fails at once, not after every
    grid point has run (a 47-minute growth grid used to fail only at its end)."""
    from fewshot.eval.plan import EvalPlan

    grid = ["transfer.fusion.correlation=false,true"]
    ten = [str(i) for i in range(1, 11)]

    def clinical(max_queries, folds=1):
        plan = EvalPlan("data", "clinical", "classic", "out", select=grid, max_queries=max_queries, folds=folds)
        plan.check()
        plan.protocol_rules().check(ten, plan.n_folds(), True)

    with pytest.raises(ValueError, match="--max-queries 1 scores 1"):
        clinical(1)
    clinical(2)
    clinical(1, folds=9)  # one scan scored per split, but not the same scan in every split: two groups
    EvalPlan("data", "alpnet", "classic", "out", select=grid, max_queries=1).check()  # alpnet selects on folds
    nine = [str(i) for i in range(1, 10)]  # 9 scans, steps up to 8: one growth query beside a pool of 8
    with pytest.raises(ValueError, match="leave 1 beside the labelled pool"):
        EvalPlan("data", "clinical", "classic", "out", growth=True, select=grid).check_growth(nine)
    EvalPlan("data", "clinical", "classic", "out", growth=True).check_growth(nine)  # without --select: fine
    twenty = [str(i) for i in range(1, 21)]
    with pytest.raises(ValueError, match="--max-queries 1 scores 1"):
        EvalPlan("data", "clinical", "classic", "out", growth=True, select=grid, max_queries=1).check_growth(twenty)
    EvalPlan("data", "clinical", "classic", "out", growth=True, select=grid, max_queries=2).check_growth(twenty)


def test_pooled_growth_selection_chooses_each_group_on_every_other_group_of_every_dataset():
    """One default for several datasets: each group is reported at the point best on all the OTHER groups, its own
    dataset's and the other dataset's; a group's own scores never choose its setting."""
    from fewshot.eval.selection import pooled_growth_selection

    def grid(dice_of):  # dice_of(point, case) -> rows at steps 1 and 2 (the same Dice at both)
        return [{"point": str(p), "strategy": s, "n_labelled": str(n), "case_id": str(c), "dice": str(dice_of(p, c))}
                for p in (0, 1) for c in (1, 2) for n in (1, 2) for s in ("bank_coverage", "random")]

    # cardiac: point 1 better by 0.10 on both scans; abdomen: point 0 better by 0.02 on scan 1 and by 0.50 on scan 2
    cardiac = grid(lambda p, c: 0.7 + 0.1 * p)
    abdomen = grid(lambda p, c: 0.8 - (0.02 if c == 1 else 0.5) * p)
    pooled = pooled_growth_selection({"cardiac": cardiac, "abdomen": abdomen})
    chosen = {(g["dataset"], tuple(g["case_ids"])): g["chosen_point"] for g in pooled["per_group"]}
    # abdomen scan 2's large preference for point 0 outweighs the cardiac scans' for point 1 wherever it counts
    # (other groups' means 0.733 against 0.633); held out itself, the others choose point 1 (0.793 against 0.733)
    assert chosen == {("cardiac", ("1",)): 0, ("cardiac", ("2",)): 0, ("abdomen", ("1",)): 0, ("abdomen", ("2",)): 1}
    assert pooled["nested"]["abdomen"] == {1: pytest.approx((0.8 + 0.3) / 2), 2: pytest.approx((0.8 + 0.3) / 2)}
    assert pooled["curves"]["cardiac"][1] == {1: pytest.approx(0.8), 2: pytest.approx(0.8)}
    with pytest.raises(ValueError, match="same growth steps"):
        pooled_growth_selection({"cardiac": cardiac, "abdomen": [r for r in abdomen if r["n_labelled"] == "1"]})


def _write_run(folder, settings, dice_by_case, supports=("5",)):
    """A minimal eval run folder: metrics.json and cases.csv, as results_tables reads them."""
    import json

    folder.mkdir()
    labels = sorted({lab for per_case in dice_by_case.values() for lab in per_case})
    per_label = {lab: {"dice_mean": float(np.mean([d[lab] for d in dice_by_case.values()])), "dice_std": 0.0,
                       "n": len(dice_by_case), "hd95_mean": 1.0} for lab in labels}
    metrics_json = {"protocol": "clinical", "preset": "classic", "dataset": {"name": "toy"}, "per_label": per_label,
                    "mean_dice": float(np.mean([v["dice_mean"] for v in per_label.values()])), "mean_hd95": 1.0,
                    "folds": [{"support_ids": list(supports)}], "timing": {"wall_seconds_per_query_slice": 0.1,
                                                                           "wall_seconds_per_volume": 2.0},
                    "max_queries": len(dice_by_case), "settings": settings, "selection": None}
    (folder / "metrics.json").write_text(json.dumps(metrics_json))
    rows = ["case_id,label_name,dice"] + [f"{c},{lab},{d}" for c, per_case in dice_by_case.items() for lab, d in per_case.items()]
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")


def test_ablation_rows_are_named_by_the_settings_the_runs_recorded(tmp_path):
    """results_tables --ablation: each row says what its run's own metrics.json changed against the reference's,
    whatever its folder is called, and refuses a run on other scans."""
    from project_scripts import load_script

    tables = load_script("results_tables")
    base = {"name": "classic", "transfer": {"fusion": {"method": "joint", "beta": 2}, "extent": {"method": "profile"}}}
    _write_run(tmp_path / "ref", base, {"1": {"a": 0.8, "b": 0.9}, "2": {"a": 0.6, "b": 0.7}})
    majority = {**base, "transfer": {**base["transfer"], "fusion": {"method": "majority", "beta": 2}}}
    _write_run(tmp_path / "misleading-name", majority, {"1": {"a": 0.7, "b": 0.9}, "2": {"a": 0.5, "b": 0.7}})
    _write_run(tmp_path / "other-scans", majority, {"1": {"a": 0.7, "b": 0.9}, "3": {"a": 0.5, "b": 0.7}})
    _write_run(tmp_path / "other-supports", majority, {"1": {"a": 0.7, "b": 0.9}, "2": {"a": 0.5, "b": 0.7}}, supports=("6",))
    lines = tables.ablation_table(tmp_path / "ref", [tmp_path / "misleading-name"]).splitlines()
    assert lines[2].startswith("| the reference, `ref` | 70.0 | 80.0 | **75.0** |  |")
    assert lines[3] == "| `fusion.method=majority` | 60.0 | 80.0 | **70.0** | -5.0 | 2.0 |"
    with pytest.raises(SystemExit, match="other query scans"):
        tables.ablation_table(tmp_path / "ref", [tmp_path / "other-scans"])
    with pytest.raises(SystemExit, match="other query scans or supports"):
        tables.ablation_table(tmp_path / "ref", [tmp_path / "other-supports"])


def test_alpnet_pairing_offers_the_chunk_or_every_support_slice_and_is_recorded():
    """--alpnet-pairing: "chunk" is the protocol's rule (a query slice gets its chunk's support slice), "all"
    offers every chunk's; metrics.json says which, and "all" is refused where there are no support slices to pair."""
    from fewshot.eval.alpnet import offered_supports
    from fewshot.eval.plan import EvalPlan

    chunks = [["a0", "a0-copy"], ["b0"], ["c0"]]
    assert offered_supports(chunks, 1, "chunk") == ["b0"]
    assert offered_supports(chunks, 1, "all") == ["a0", "a0-copy", "b0", "c0"]
    with pytest.raises(ValueError, match="pairing"):
        offered_supports(chunks, 0, "nearest")

    plan = EvalPlan("data", "alpnet", "classic", "out", alpnet_pairing="all")
    plan.check()
    info = plan.protocol_rules().info(5, None)
    assert info["pairing"] == "all" and "NOT the protocol's pairing" in info["pairing_note"]
    assert EvalPlan("data", "alpnet", "classic", "out").protocol_rules().info(5, None)["pairing"] == "chunk"
    with pytest.raises(ValueError, match="--alpnet-support slices"):
        EvalPlan("data", "alpnet", "classic", "out", alpnet_support="volume", alpnet_pairing="all").check()
    with pytest.raises(ValueError, match="--protocol alpnet"):
        EvalPlan("data", "clinical", "classic", "out", alpnet_pairing="all").check()
    with pytest.raises(ValueError, match="unknown --alpnet-pairing"):
        EvalPlan("data", "alpnet", "classic", "out", alpnet_pairing="nearest").check()
