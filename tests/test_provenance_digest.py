"""The canonical digest: one grey level anywhere changes it; lossless re-encodings and allowed metadata do not."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from provenance_support import isic_jpegs, save_png, small_npz
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid

from medadv.errors import MedadvError
from medadv.provenance.digest import digest_array, digest_file, digest_npz, pixel_digest

MR = "MR_small.dcm"  # 64x64, 16-bit signed, windowed (WindowCenter 600 / WindowWidth 1600)


def dicom(name: str = MR) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def save_dicom(ds: pydicom.Dataset, path: Path, **kwargs: object) -> Path:
    ds.save_as(path, enforce_file_format=True, **kwargs)
    return path


# ------------------------------------------------------------------------------------------------ PNG


def test_png_one_grey_level_in_one_pixel_changes_the_digest(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(1, 255, (32, 40), dtype=np.uint8)
    base = digest_file(save_png(tmp_path / "a.png", img)).digest
    for (y, x), delta in [((0, 0), 1), ((31, 39), -1), ((17, 5), 1)]:
        edited = img.copy()
        edited[y, x] = int(img[y, x]) + delta
        assert digest_file(save_png(tmp_path / "b.png", edited)).digest != base


def test_png_lossless_resaves_keep_the_digest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    a = digest_file(save_png(tmp_path / "a.png", rgb, compress_level=0)).digest
    b = digest_file(save_png(tmp_path / "b.png", rgb, compress_level=9, optimize=True)).digest
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert a == b
    # the same colours as a palette PNG: the palette is resolved, so the digest is the true-colour one
    few = rgb // 128 * 128
    pal = Image.fromarray(few).quantize(colors=8, dither=Image.Dither.NONE)
    assert np.array_equal(np.asarray(pal.convert("RGB")), few)
    pal.save(tmp_path / "p.png")
    assert digest_file(tmp_path / "p.png").digest == digest_file(save_png(tmp_path / "t.png", few)).digest


def test_png_16_bit_grey_sees_every_level(tmp_path: Path) -> None:
    img = np.random.default_rng(2).integers(0, 65535, (16, 16), dtype=np.uint16)
    base = digest_file(save_png(tmp_path / "a.png", img)).digest
    edited = img.copy()
    edited[3, 4] ^= 1  # the lowest bit: invisible at 8 bits
    assert digest_file(save_png(tmp_path / "b.png", edited)).digest != base
    assert digest_file(tmp_path / "a.png").meta["photometric"] == "I;16"


def _png16_rgb(path: Path, arr: np.ndarray) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16_bit_colour_png_is_refused_not_truncated(tmp_path: Path) -> None:
    path = _png16_rgb(tmp_path / "c16.png", np.full((4, 4, 3), 1000, np.uint16))
    with Image.open(path) as im:
        assert im.mode == "RGB"  # Pillow really does decode it to 8 bits
    with pytest.raises(MedadvError, match="16-bit colour PNG"):
        digest_file(path)


# ----------------------------------------------------------------------------------------------- JPEG


def test_real_jpeg_digest_ignores_metadata_segments_but_not_reencoding(tmp_path: Path) -> None:
    src = isic_jpegs(1)[0]
    base = digest_file(src)
    assert base.meta["format"] == "jpeg" and base.meta["shape"] == [256, 256, 3]
    data = src.read_bytes()
    comment = b"scanned at site 4"
    with_com = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    (tmp_path / src.name).write_bytes(with_com)
    assert digest_file(tmp_path / src.name).digest == base.digest
    with Image.open(src) as im:
        im.save(tmp_path / "q95.jpg", quality=95)
    assert digest_file(tmp_path / "q95.jpg").digest != base.digest


# ---------------------------------------------------------------------------------------------- DICOM


def test_dicom_16_bit_one_stored_level_changes_the_digest(tmp_path: Path) -> None:
    ds = dicom()
    assert ds.BitsStored == 16 and "WindowCenter" in ds
    base = digest_file(get_testdata_file(MR)).digest
    for delta in (1, -1):
        ds = dicom()
        arr = ds.pixel_array.copy()
        arr[40, 13] += delta
        ds.PixelData = arr.tobytes()
        assert digest_file(save_dicom(ds, tmp_path / "edited.dcm")).digest != base


@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding:UserWarning")  # MR_small_padded, on purpose
def test_dicom_transfer_syntaxes_share_one_digest(tmp_path: Path) -> None:
    """pydicom's own MR_small in five encodings (explicit/implicit, big/little endian, RLE, JPEG 2000
    lossless) decodes to the same pixels, so to the same digest; so does our RLE re-encoding."""
    base = digest_file(get_testdata_file(MR)).digest
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_padded.dcm"):
        assert digest_file(get_testdata_file(name)).digest == base, name
    ds = dicom()
    ds.compress(RLELossless)  # pydicom gives it a new SOPInstanceUID, which the digest leaves out
    assert ds.SOPInstanceUID != dicom().SOPInstanceUID
    assert digest_file(save_dicom(ds, tmp_path / "rle.dcm")).digest == base
    ds = dicom()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert digest_file(save_dicom(ds, tmp_path / "implicit.dcm")).digest == base


def test_dicom_allowed_metadata_changes_keep_the_digest(tmp_path: Path) -> None:
    base = digest_file(get_testdata_file(MR)).digest
    ds = dicom()
    ds.PatientName = "Anonymous^Patient"  # descriptive; PatientID is identity (issue 9) and is not allowed
    ds.InstitutionName = "Elsewhere"
    ds.PatientBirthDate = ""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.private_block(0x0011, "medadv test", create=True).add_new(0x01, "LO", "private note")
    ds.RescaleSlope, ds.RescaleIntercept = "1.0", "0"  # explicit identity rescale reads the same
    assert digest_file(save_dicom(ds, tmp_path / "anon.dcm")).digest == base


@pytest.mark.parametrize("tag, value", [
    ("StudyInstanceUID", "1.2.3.4.5"), ("SeriesInstanceUID", "1.2.3.4.6"), ("PatientID", "OTHER-1"),
    ("Laterality", "L"), ("ImageLaterality", "R"), ("ViewPosition", "PA"), ("BodyPartExamined", "KNEE"),
    ("PixelSpacing", [0.5, 0.5]), ("WindowCenter", "601"),
    ("WindowWidth", "1200"), ("RescaleIntercept", "-1024"), ("PhotometricInterpretation", "MONOCHROME1"),
])
def test_dicom_identity_and_display_changes_change_the_digest(tmp_path: Path, tag: str, value: str) -> None:
    base = digest_file(get_testdata_file(MR)).digest
    ds = dicom()
    setattr(ds, tag, value)
    assert digest_file(save_dicom(ds, tmp_path / "x.dcm")).digest != base


def test_rgb_dicom_rle_decodes_like_its_uncompressed_copy(tmp_path: Path) -> None:
    src = get_testdata_file("SC_rgb_rle.dcm")
    ds = pydicom.dcmread(src)
    ds.decompress(generate_instance_uid=False)
    assert digest_file(save_dicom(ds, tmp_path / "raw.dcm")).digest == digest_file(src).digest


# ------------------------------------------------------------------------------------------- npz, arrays


def test_npz_members_are_named_and_match_their_png_export(tmp_path: Path) -> None:
    npz = small_npz(tmp_path, per_split=3)
    members = digest_npz(npz)
    assert [m.name for m in members][:4] == ["pneumoniamnist.npz#train/0", "pneumoniamnist.npz#train/1",
                                             "pneumoniamnist.npz#train/2", "pneumoniamnist.npz#val/0"]
    with np.load(npz) as z:
        img = z["test_images"][2]
    picked = digest_npz(npz, [("test", 2), ("train", 0), ("test", 2)])  # the caller's order, repeats kept
    assert [m.name.split("#")[1] for m in picked] == ["test/2", "train/0", "test/2"]
    assert picked[0].digest == digest_array(img, "x").digest
    # a lossless export of a member to PNG is the same image, so the same digest
    assert digest_file(save_png(tmp_path / "member.png", img)).digest == digest_array(img, "x").digest


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), c=st.sampled_from([1, 3]), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["uint8", "uint16", "int16"]))
def test_pixel_digest_sees_every_value_and_ignores_layout(h: int, w: int, c: int, seed: int, dtype: str) -> None:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    arr = rng.integers(info.min + 1, info.max, (h, w, c), dtype=dtype, endpoint=False)  # room for +-1
    base = pixel_digest(arr, "X")
    assert pixel_digest(arr.astype(arr.dtype.newbyteorder(">")), "X") == base  # byte order
    assert pixel_digest(np.asfortranarray(arr), "X") == base  # memory layout
    y, x, k = rng.integers(h), rng.integers(w), rng.integers(c)
    for delta in (1, -1):
        edited = arr.copy()
        edited[y, x, k] = int(arr[y, x, k]) + delta
        assert pixel_digest(edited, "X") != base
    assert pixel_digest(arr, "Y") != base  # photometric interpretation
    if h * w > 1:
        assert pixel_digest(arr.reshape(w, h, c), "X") != base or h == w  # shape


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # the garbage DICOM, on purpose
def test_unreadable_files_raise_one_clear_error(tmp_path: Path) -> None:
    png = save_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "truncated.png").write_bytes(png.read_bytes()[:40])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    ds = dicom()
    ds.PixelData = ds.PixelData[:100]
    save_dicom(ds, tmp_path / "short.dcm")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.bmp")
    cases = {"missing.png": "does not exist", "truncated.png": "corrupt", "text.jpg": "corrupt",
             "garbage.dcm": "DICOM|no image", "short.dcm": "malformed DICOM header.*codecs will not help", "x.bmp": "BMP"}
    for name, words in cases.items():
        with pytest.raises(MedadvError, match=words) as info:
            digest_file(tmp_path / name)
        assert name in str(info.value) and info.value.fix, name
