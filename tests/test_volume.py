"""Volume I/O: exact geometry round trips, slicing axis, normalisation, and clear errors on bad files."""
import nibabel as nib
import numpy as np
import pytest

from conftest import shared_dataset
from fewshot.config import ConfigError, deep_merge, load_preset
from fewshot.settings import VolumeSettings
from fewshot.volume import (
    VolumeError,
    canvas_to_label,
    choose_axis,
    label_to_canvas,
    normalise_intensity,
    read_label,
    read_volume,
    volume_to_canvas,
    write_label,
)



def volume_settings(intensity: dict | None = None, **keys) -> VolumeSettings:
    """The presets' volume section (foundation.yaml's, which every preset inherits) with these keys changed."""
    return VolumeSettings.from_settings(deep_merge(load_preset("foundation")["volume"], dict(keys, intensity=intensity or {})))


SETTINGS = volume_settings(pixel_spacing_mm=1.25, canvas=128, intensity={"modality": "mr"})


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _blob_volume(shape):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    image = (np.exp(-(zz**2 + yy**2 + xx**2) * 3) * 1000).astype(np.float32)
    label = np.zeros(shape, np.uint16)
    label[(zz**2 + yy**2 + xx**2) < 0.3] = 7
    label[(zz - 0.5) ** 2 + yy**2 + xx**2 < 0.15] = 9
    return image, label


AFFINES = {
    "ras_aniso": np.diag([0.9, 1.1, 5.0, 1.0]),
    "lps_flipped": np.diag([-1.2, -1.2, 4.0, 1.0]),
    "permuted_oblique": np.array([[0, 0, 3.5, 10], [1.3, 0.1, 0, -5], [0, -1.3, 0, 7], [0, 0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_round_trip_keeps_shape_affine_and_labels(tmp_path, name):
    image, label = _blob_volume((40, 36, 12))
    affine = AFFINES[name]
    vol = read_volume(_save(tmp_path / "img.nii.gz", image, affine))
    lab = read_label(_save(tmp_path / "lab.nii.gz", label, affine), vol)
    canvas, geom = volume_to_canvas(vol, SETTINGS)
    assert canvas.dtype == np.float32 and canvas.min() >= 0 and canvas.max() <= 1
    # The coarse axis (5 mm / 4 mm / 3.5 mm) is chosen to slice along, whatever the file's axis order.
    assert canvas.shape[0] == 12
    masks = label_to_canvas(lab, geom)
    assert set(np.unique(masks)) <= {0, 7, 9}
    probs = np.stack([(masks == v).astype(np.float32) for v in (7, 9)], axis=1)
    back = canvas_to_label(probs, [7, 9], geom)
    assert back.shape == image.shape
    for v in (7, 9):
        inter = ((back == v) & (label == v)).sum()
        assert 2 * inter / ((back == v).sum() + (label == v).sum()) > 0.85
    out = tmp_path / "out.nii.gz"
    write_label(out, back, vol)
    written = nib.load(str(out))
    assert written.shape == image.shape
    np.testing.assert_array_equal(written.affine, nib.load(str(tmp_path / "img.nii.gz")).affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine)


def test_real_volumes_round_trip_exactly():
    for name in ("chaos-t2", "cmr-bssfp"):
        root = shared_dataset(name)
        image_path = sorted(root.glob("image_*.nii.gz"))[0]
        vol = read_volume(image_path)
        lab = read_label(str(image_path).replace("image_", "label_"), vol)
        # At the data's own spacing the canvas is lossless: one-hot probabilities give the label back exactly.
        canvas, geom = volume_to_canvas(vol, volume_settings(pixel_spacing_mm=1.25, canvas=256))
        masks = label_to_canvas(lab, geom)
        values = [int(v) for v in np.unique(lab) if v]
        probs = np.stack([(masks == v).astype(np.float32) for v in values], axis=1)
        np.testing.assert_array_equal(canvas_to_label(probs, values, geom), lab)


def test_axis_choice():
    assert choose_axis((1.0, 1.0, 5.0), "auto") == 2
    assert choose_axis((8.0, 1.25, 1.25), "auto") == 0
    assert choose_axis((1.0, 1.0, 1.0), "auto") == 2  # isotropic: axial
    assert choose_axis((1.0, 1.0, 5.0), 1) == 1
    with pytest.raises(VolumeError):
        choose_axis((1.0, 1.0, 1.0), 3)


def test_intensity_presets():
    ct = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32)
    out = normalise_intensity(ct, volume_settings(intensity={"modality": "auto", "ct_window": "abdomen"}).intensity)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    mr = np.arange(1000, dtype=np.float32)
    out = normalise_intensity(mr, volume_settings(intensity={"modality": "mr", "mr_percentiles": [1, 99]}).intensity)
    assert out.min() == 0 and out.max() == 1 and 0.45 < out[500] < 0.55
    assert normalise_intensity(np.full(10, 5.0, np.float32), SETTINGS.intensity).max() == 0


def test_the_volume_section_is_typed_and_checked_once_with_the_presets_values():
    # No code default: the presets' 1.25 mm (the code once fell back to 1.0 mm), and a missing key is named.
    assert volume_settings().pixel_spacing_mm == 1.25 and volume_settings().intensity.window() == (40.0, 400.0)
    assert VolumeSettings.from_settings(load_preset("random-tiny")["volume"]).canvas == 128
    section = load_preset("foundation")["volume"]
    del section["pixel_spacing_mm"]
    with pytest.raises(ConfigError, match=r"volume.pixel_spacing_mm is not set \(configs/presets/foundation.yaml"):
        VolumeSettings.from_settings(section)
    for keys, message in (({"canvas": "256"}, r"volume.canvas must be int, not '256'"),
                          ({"slicing_axis": 3}, r"slicing_axis must be auto, 0, 1 or 2"),
                          ({"slicing_axis": "axial"}, r"volume.slicing_axis must be one of 'auto' or int"),
                          ({"pixel_spacing": 1.0}, r"volume has no setting pixel_spacing"),  # a typo is no silent default
                          ({"intensity": {"ct_window": "lungs"}}, r"ct_window 'lungs' is not one of ct_windows"),
                          ({"intensity": {"ct_window": [40, -1]}}, r"positive width"),
                          ({"intensity": {"mr_percentiles": [99, 1]}}, r"mr_percentiles must be 0 <= low < high"),
                          ({"intensity": {"modality": "pet"}}, r"volume.intensity.modality must be one of 'auto', 'mr', 'ct'")):
        with pytest.raises(ConfigError, match=message):
            volume_settings(**keys)


def test_resampling_gives_anatomy_comparable_size(tmp_path):
    # The same 40 mm square at 1 mm and at 2 mm spacing covers the same canvas area.
    sizes = []
    for spacing, n in ((1.0, 80), (2.0, 40)):
        img = np.zeros((n, n, 4), np.float32)
        c = n // 2
        half = int(20 / spacing)
        img[c - half : c + half, c - half : c + half] = 100
        vol = read_volume(_save(tmp_path / f"sq{spacing}.nii.gz", img, np.diag([spacing, spacing, 5, 1])))
        canvas, _ = volume_to_canvas(vol, volume_settings(pixel_spacing_mm=1.0, canvas=96, intensity={"modality": "mr"}))
        sizes.append((canvas[0] > 0.5).sum())
    assert abs(sizes[0] - sizes[1]) / sizes[0] < 0.1


def test_bad_files_get_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(VolumeError, match="not a readable medical image"):
        read_volume(garbage)
    text = tmp_path / "notes.nii"
    text.write_text("this is not an image")
    with pytest.raises(VolumeError):
        read_volume(text)
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(VolumeError, match="empty"):
        read_volume(empty)
    flat = _save(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.float32), np.eye(4))
    with pytest.raises(VolumeError, match="expected a 3D image"):
        read_volume(flat)
    nan = np.zeros((8, 8, 4), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        read_volume(_save(tmp_path / "nan.nii.gz", nan, np.eye(4)))
    # An uncompressed NIfTI named .nii.gz: MONAI reads it, nibabel (whose header labels are written
    # with) does not; still one clear VolumeError, not nibabel's exception.
    plain = _save(tmp_path / "plain.nii", np.zeros((8, 8, 4), np.float32), np.eye(4))
    misnamed = tmp_path / "misnamed.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    with pytest.raises(VolumeError, match="not a (readable NIfTI file|readable medical image)"):
        read_volume(misnamed)


def test_labels_are_checked_against_their_image(tmp_path):
    image, label = _blob_volume((20, 20, 6))
    vol = read_volume(_save(tmp_path / "img.nii.gz", image, np.eye(4)))
    with pytest.raises(VolumeError, match="does not match image shape"):
        read_label(_save(tmp_path / "small.nii.gz", label[:10], np.eye(4)), vol)
    with pytest.raises(VolumeError, match="affine"):
        read_label(_save(tmp_path / "moved.nii.gz", label, np.diag([2, 2, 2, 1.0])), vol)
    with pytest.raises(VolumeError, match="integers"):
        read_label(_save(tmp_path / "frac.nii.gz", label.astype(np.float32) + 0.5, np.eye(4)), vol)
    with pytest.raises(VolumeError, match="not among the configured labels"):
        read_label(_save(tmp_path / "unknown.nii.gz", label, np.eye(4)), vol, allowed=[7])
    assert read_label(_save(tmp_path / "ok.nii.gz", label, np.eye(4)), vol, allowed=[7, 9]).dtype == np.uint16


def _body_phantom(shape, spacing, body_mm=(280.0, 220.0), organ_at_mm=(60.0, -40.0), organ_radius_mm=40.0):
    """A bright elliptical body in air with a brighter round organ, sampled on a grid of ``shape`` at
    ``spacing`` mm centred on the body: the same physical scene at any field of view."""
    n0, n1, nz = shape
    y = (np.arange(n0) - (n0 - 1) / 2) * spacing
    x = (np.arange(n1) - (n1 - 1) / 2) * spacing
    yy, xx = np.meshgrid(y, x, indexing="ij")
    body = (yy / (body_mm[0] / 2)) ** 2 + (xx / (body_mm[1] / 2)) ** 2 < 1
    organ = (yy - organ_at_mm[0]) ** 2 + (xx - organ_at_mm[1]) ** 2 < organ_radius_mm**2
    image = np.repeat((200.0 * body + 300.0 * organ)[..., None], nz, axis=2).astype(np.float32)
    label = np.repeat(organ[..., None], nz, axis=2).astype(np.uint16) * 3
    return image, label, np.diag([-spacing, spacing, 5.0, 1.0])


def test_the_same_object_has_the_same_size_at_any_field_of_view(tmp_path, caplog):
    """One physical scale per bank: a 40 mm-radius organ covers the same canvas pixels whether the
    scanner's field of view is 300 mm (1.17 mm pixels) or 500 mm (0.98 mm, a 512² CT); the wide one
    is cropped around the body, never resampled coarser (which made it 1.57x smaller)."""
    settings = volume_settings(pixel_spacing_mm=1.25, canvas=256, intensity={"modality": "mr"})
    areas = {}
    for name, shape, spacing in (("narrow", (256, 256, 3), 300 / 256), ("wide", (512, 512, 3), 500 / 512)):
        image, label, affine = _body_phantom(shape, spacing)
        vol = read_volume(_save(tmp_path / f"{name}.nii.gz", image, affine))
        lab = read_label(_save(tmp_path / f"{name}_label.nii.gz", label, affine), vol)
        caplog.clear()
        with caplog.at_level("INFO", logger="fewshot.volume"):
            canvas, geom = volume_to_canvas(vol, settings)
        assert geom.pixel_spacing_mm == 1.25
        masks = label_to_canvas(lab, geom)
        areas[name] = int((masks[1] == 3).sum())
        back = canvas_to_label(np.stack([(masks == 3).astype(np.float32)], axis=1), [3], geom)
        assert back.shape == shape
        dice = 2 * ((back == 3) & (label == 3)).sum() / ((back == 3).sum() + (label == 3).sum())
        assert dice > 0.95, (name, dice)
        if name == "wide":
            assert min(geom.offset) < 0  # cropped
            assert "cropped around the body" in caplog.text and "cut off" not in caplog.text
            # The body (280 x 220 mm) is whole on the 320 mm canvas: its edge rows are inside it.
            body_rows = np.flatnonzero((canvas[1] > 0.1).any(axis=1))
            assert body_rows[0] > 0 and body_rows[-1] < 255
    expected = np.pi * (40 / 1.25) ** 2
    assert areas["wide"] == pytest.approx(areas["narrow"], rel=0.03)
    assert areas["wide"] == pytest.approx(expected, rel=0.05)


def test_a_body_wider_than_the_canvas_is_cut_and_said_so(tmp_path, caplog):
    settings = volume_settings(pixel_spacing_mm=1.25, canvas=128, intensity={"modality": "mr"})  # 160 mm
    image, label, affine = _body_phantom((400, 400, 2), 1.0, body_mm=(300.0, 300.0), organ_at_mm=(0.0, 0.0))
    vol = read_volume(_save(tmp_path / "big.nii.gz", image, affine))
    with caplog.at_level("INFO", logger="fewshot.volume"):
        _, geom = volume_to_canvas(vol, settings)
    assert geom.pixel_spacing_mm == 1.25
    assert "cut off" in caplog.text and "volume.canvas to at least 320" in caplog.text
    # Cut evenly around the body's centre: the organ at the centre is whole.
    lab = read_label(_save(tmp_path / "big_label.nii.gz", label, affine), vol)
    masks = label_to_canvas(lab, geom)
    assert int((masks[0] == 3).sum()) == pytest.approx(np.pi * (40 / 1.25) ** 2, rel=0.05)


def test_a_field_of_view_that_fits_is_centred_uncropped(tmp_path, caplog):
    settings = volume_settings(pixel_spacing_mm=1.25, canvas=256, intensity={"modality": "mr"})
    image = np.random.default_rng(0).random((200, 200, 4)).astype(np.float32) * 100
    affine = np.diag([-0.8, 0.8, 5.0, 1.0])
    small = volume_to_canvas(read_volume(_save(tmp_path / "small.nii.gz", image, affine)), settings)[1]
    assert small.pixel_spacing_mm == 1.25 and min(small.offset) >= 0
    # Exactly the canvas (CHAOS and CMR: 256 px x 1.25 mm), with float32 spacing that makes the extent
    # 320.00003 mm: it fits, so nothing is cropped and nothing is logged.
    exact_affine = np.diag([np.float32(1.2500001), np.float32(1.2500001), 7.7, 1.0])
    big = np.random.default_rng(1).random((256, 256, 4)).astype(np.float32)
    exact = read_volume(_save(tmp_path / "exact.nii.gz", big, exact_affine))
    with caplog.at_level("INFO", logger="fewshot.volume"):
        exact_geom = volume_to_canvas(exact, settings)[1]
    assert exact_geom.pixel_spacing_mm == 1.25 and exact_geom.resampled_shape == (256, 256) and exact_geom.offset == (0, 0)
    assert "cropped" not in caplog.text and "cut off" not in caplog.text


@pytest.mark.parametrize("codes", [("L", "S", "P"), ("P", "S", "R"), ("S", "L", "A"), ("R", "A", "I")])
def test_canvas_slices_map_to_the_files_own_slice_numbers(tmp_path, codes):
    """Canvas slices run in RAS order; provenance must name the file's slice: find it again on disk."""
    ornt = nib.orientations.axcodes2ornt(codes)
    affine = np.eye(4)
    spacing = (1.2, 1.3, 6.0)  # file axis 2 is the coarse one, so it is the slicing axis
    for file_axis, (ras_axis, flip) in enumerate(ornt):
        affine[int(ras_axis), file_axis] = flip * spacing[file_axis]
    shape = (30, 28, 9)
    label = np.zeros(shape, np.uint16)
    label[10:20, 10:20, 2] = 4  # on file slice 2 only
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    vol = read_volume(_save(tmp_path / "img.nii.gz", image, affine))
    canvas, geom = volume_to_canvas(vol, SETTINGS)
    masks = label_to_canvas(read_label(_save(tmp_path / "lab.nii.gz", label, affine), vol), geom)
    (z,) = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    assert geom.file_axis == 2 and geom.file_slice(z) == 2
    assert sorted(geom.file_slice(i) for i in range(len(canvas))) == list(range(9))


def test_single_slice_volume_is_a_2d_image(tmp_path):
    for shape in ((64, 64, 1), (64, 1, 64)):
        path = _save(tmp_path / "one.nii.gz", np.zeros(shape, np.float32), np.eye(4))
        with pytest.raises(VolumeError, match="expected a 3D image, got a 2D image"):
            read_volume(path)


def test_labels_are_written_as_nifti_only(tmp_path):
    image, label = _blob_volume((20, 20, 6))
    vol = read_volume(_save(tmp_path / "img.nii.gz", image, np.eye(4)))
    with pytest.raises(VolumeError, match="NIfTI"):
        write_label(tmp_path / "out.nrrd", label, vol)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".tmp-*"))


def test_nrrd_input_round_trip(tmp_path):
    """NRRD (read by MONAI's LoadImage) in, NIfTI label out with the same voxel-to-world mapping."""
    sitk = pytest.importorskip("SimpleITK")
    image, label = _blob_volume((8, 36, 40))  # SimpleITK order: z, y, x
    itk_image = sitk.GetImageFromArray(image)
    itk_image.SetSpacing((0.9, 1.1, 4.0))
    itk_image.SetOrigin((12.0, -30.0, 7.0))
    itk_image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    sitk.WriteImage(itk_image, str(tmp_path / "img.nrrd"))
    vol = read_volume(tmp_path / "img.nrrd")
    assert vol.shape == (40, 36, 8)
    # ITK's LPS direction/origin, expressed in RAS as NIfTI affines are.
    expected = np.eye(4)
    expected[:3, :3] = np.array(itk_image.GetDirection()).reshape(3, 3) * np.array(itk_image.GetSpacing())
    expected[:3, 3] = itk_image.GetOrigin()
    expected = np.diag([-1, -1, 1, 1]) @ expected
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    canvas, geom = volume_to_canvas(vol, SETTINGS)
    assert canvas.shape[0] == 8
    lab = label.transpose(2, 1, 0)
    masks = label_to_canvas(lab, geom)
    probs = np.stack([(masks == v).astype(np.float32) for v in (7, 9)], axis=1)
    back = canvas_to_label(probs, [7, 9], geom)
    write_label(tmp_path / "out.nii.gz", back, vol)
    written = nib.load(str(tmp_path / "out.nii.gz"))
    assert written.shape == vol.shape
    np.testing.assert_allclose(written.affine, expected, atol=1e-4)
