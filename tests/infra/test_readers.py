"""Readers: every rejection reason on a real broken file, ids, tiles + catalogs, arrays."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

import infra.readers
from infra.errors import InputError
from infra.readers import Cutout, Rejected, count_items, iter_source

BANDS = ("g", "r", "i", "z", "y")


def write_cube(path, data=None, objid=None, shape=(5, 8, 8), dtype=np.float32, **header):
    """A (B, H, W) cube in the primary HDU, with OBJID and other keywords in the header."""
    data = np.random.default_rng(0).random(shape).astype(dtype) if data is None else data
    hdu = fits.PrimaryHDU(data)
    if objid is not None:
        hdu.header["OBJID"] = objid
    for k, v in header.items():
        hdu.header[k] = v
    hdu.writeto(path)
    return path


def read_one(path, **kw):
    kw = {"bands": BANDS, "shape": (8, 8), **kw}
    (item,) = list(iter_source(str(path), **kw))
    return item


def rejected_reason(path, **kw) -> str:
    item = read_one(path, **kw)
    assert isinstance(item, Rejected), item
    assert item.source == str(path)
    return item.reason


# ---- one test per rejection reason -----------------------------------------------------------
def test_truncated_fits_is_rejected(tmp_path):
    good = write_cube(tmp_path / "good.fits")
    data = good.read_bytes()
    (tmp_path / "cut.fits").write_bytes(data[: len(data) - 2000])  # into the pixels (they end at 4160)
    assert rejected_reason(tmp_path / "cut.fits") == "truncated: 3760 bytes, its headers say 4160; fetch the file again"


def test_file_missing_only_its_final_padding_is_read(tmp_path):
    """Every pixel is there; only the zeros that round the file up to 2880-byte blocks are not."""
    data = write_cube(tmp_path / "good.fits").read_bytes()
    (tmp_path / "short.fits").write_bytes(data[:4160])
    c = read_one(tmp_path / "short.fits")
    assert isinstance(c, Cutout)
    np.testing.assert_array_equal(c.pixels, fits.getdata(tmp_path / "good.fits"))


def test_file_cut_inside_its_header_is_rejected(tmp_path):
    data = write_cube(tmp_path / "good.fits").read_bytes()
    (tmp_path / "cut.fits").write_bytes(data[:500])  # before the END card (card 8, at byte 560)
    assert rejected_reason(tmp_path / "cut.fits") == "not a FITS file (its header has no END card)"
    (tmp_path / "cut.fits").write_bytes(data[:2000])  # after END, in the header's padding
    assert rejected_reason(tmp_path / "cut.fits") == "truncated: 2000 bytes, its headers say 4160; fetch the file again"


def test_extension_cut_off_is_rejected(tmp_path):
    """A lost extension header leaves fewer bands: it must read as damage, not as a 4-band cutout."""
    fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(np.ones((8, 8), np.float32)) for _ in BANDS]).writeto(
        tmp_path / "mef.fits")
    data = (tmp_path / "mef.fits").read_bytes()
    (tmp_path / "cut.fits").write_bytes(data[: len(data) - 2880 - 1500])  # into the last extension's header
    assert rejected_reason(tmp_path / "cut.fits").startswith("truncated")


def test_garbage_bytes_named_fits_are_rejected(tmp_path):
    path = tmp_path / "obj.fits"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    assert rejected_reason(path) == "not a FITS file (no SIMPLE card at its start)"


@pytest.mark.parametrize("name", ["README", ".DS_Store", "notes.txt"])
def test_text_and_hidden_files_are_rejected_as_not_fits(tmp_path, name):
    (tmp_path / name).write_text("these are my cutouts\n")
    assert "not a FITS file" in rejected_reason(tmp_path / name)


def test_empty_file_is_rejected(tmp_path):
    (tmp_path / "empty.fits").write_bytes(b"")
    assert rejected_reason(tmp_path / "empty.fits") == "empty file (0 bytes): not a FITS file"


def test_wrong_band_count_names_the_store_bands(tmp_path):
    path = write_cube(tmp_path / "obj.fits", shape=(3, 8, 8))
    assert rejected_reason(path) == "3 bands, store has 5 (g,r,i,z,y)"
    assert rejected_reason(path, bands=5) == "3 bands, store has 5"


def test_wrong_shape_is_rejected(tmp_path):
    path = write_cube(tmp_path / "obj.fits", shape=(5, 16, 12))
    assert rejected_reason(path).startswith("cutout 16x12 px, store has 8x8")


def test_first_good_cutout_sets_bands_and_shape_when_not_given(tmp_path):
    write_cube(tmp_path / "a.fits", data=np.full((5, 8, 8), np.nan, np.float32))  # bad: must not set the shape
    write_cube(tmp_path / "b.fits", shape=(2, 6, 6))
    write_cube(tmp_path / "c.fits", shape=(2, 8, 8))
    write_cube(tmp_path / "d.fits", shape=(3, 6, 6))
    write_cube(tmp_path / "e.fits", shape=(2, 6, 6))
    items = list(iter_source(str(tmp_path), bands=None, shape=None))
    assert [type(i).__name__ for i in items] == ["Rejected", "Cutout", "Rejected", "Rejected", "Cutout"]
    assert items[2].reason.startswith("cutout 8x8 px, earlier cutouts are 6x6")
    assert items[3].reason == "3 bands, earlier cutouts have 2"


def test_all_nan_cutout_is_rejected(tmp_path):
    data = np.full((5, 8, 8), np.nan, np.float32)
    data[0, 0, 0] = np.inf
    assert rejected_reason(write_cube(tmp_path / "obj.fits", data=data)).startswith("all-NaN cutout")


def test_too_many_missing_pixels_are_rejected_with_percentages(tmp_path):
    data = np.ones((5, 8, 8), np.float32)
    data.reshape(-1)[:118] = np.nan  # 118 / 320 = 36.9 %
    assert rejected_reason(write_cube(tmp_path / "obj.fits", data=data)) == "37% missing pixels > 25% threshold"
    assert isinstance(read_one(tmp_path / "obj.fits", max_missing_frac=0.5), Cutout)


def test_missing_fraction_just_over_threshold_reads_unequal(tmp_path):
    data = np.ones((5, 8, 8), np.float32)
    data.reshape(-1)[:81] = np.nan  # 25.3 % against 25 %
    assert rejected_reason(write_cube(tmp_path / "obj.fits", data=data)) == "25.3% missing pixels > 25.0% threshold"


def test_no_image_data_is_rejected(tmp_path):
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"a": [1, 2]}))]).writeto(tmp_path / "t.fits")
    assert rejected_reason(tmp_path / "t.fits") == "no image data in any HDU"


def test_four_dimensional_image_is_rejected(tmp_path):
    path = write_cube(tmp_path / "obj.fits", shape=(2, 5, 8, 8))
    assert rejected_reason(path).startswith("4-D image (2, 5, 8, 8)")


def test_band_images_of_different_shapes_are_rejected(tmp_path):
    fits.HDUList([fits.PrimaryHDU(np.ones((8, 8), np.float32)), fits.ImageHDU(np.ones((8, 6), np.float32))]).writeto(
        tmp_path / "obj.fits")
    assert rejected_reason(tmp_path / "obj.fits").startswith("band images differ in shape")


def test_any_unexpected_error_becomes_an_unreadable_rejection(tmp_path, monkeypatch):
    write_cube(tmp_path / "obj.fits")

    def boom(path, spec, check):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(infra.readers, "_read_fits_file", boom)
    assert rejected_reason(tmp_path / "obj.fits") == "unreadable: RuntimeError: disk on fire"


# ---- good cutouts ----------------------------------------------------------------------------
def test_a_few_missing_pixels_are_kept_as_nan_and_counted(tmp_path):
    data = np.ones((5, 8, 8), np.float32)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    c = read_one(write_cube(tmp_path / "obj.fits", data=data))
    assert isinstance(c, Cutout) and c.n_missing == 3
    assert np.isnan(c.pixels[0, 0, :3]).all() and np.isfinite(c.pixels).sum() == 320 - 3


def test_big_endian_integers_become_native_float32(tmp_path):
    data = np.arange(5 * 8 * 8, dtype=">i2").reshape(5, 8, 8)
    c = read_one(write_cube(tmp_path / "obj.fits", data=data))
    assert c.pixels.dtype == np.dtype(np.float32) and c.pixels.dtype.isnative
    np.testing.assert_array_equal(c.pixels, data.astype(np.float32))


def test_objid_comes_from_the_header(tmp_path):
    c = read_one(write_cube(tmp_path / "file_name.fits", objid=4242, RA=150.5, DEC=-2.25))
    assert (c.object_id, c.ra, c.dec) == ("4242", 150.5, -2.25)


def test_objid_from_an_extension_and_a_custom_keyword(tmp_path):
    ext = fits.ImageHDU(np.ones((5, 8, 8), np.float32))
    ext.header["SRCID"] = "hsc-77"
    fits.HDUList([fits.PrimaryHDU(), ext]).writeto(tmp_path / "x.fits")
    assert read_one(tmp_path / "x.fits", objid_key="SRCID").object_id == "hsc-77"


def test_id_falls_back_to_the_file_stem(tmp_path):
    c = read_one(write_cube(tmp_path / "obj_0042.fits"))
    assert c.object_id == "obj_0042" and np.isnan(c.ra)


def test_one_image_hdu_per_band(tmp_path):
    planes = [np.full((8, 8), b, np.float32) for b in range(5)]
    fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(p, name=b) for p, b in zip(planes, BANDS)]).writeto(
        tmp_path / "mef.fits")
    c = read_one(tmp_path / "mef.fits")
    assert c.pixels.shape == (5, 8, 8)
    np.testing.assert_array_equal(c.pixels[:, 0, 0], np.arange(5))


def test_ra_dec_from_the_cutout_wcs(tmp_path):
    w = _wcs(crpix=(4.5, 4.5))
    fits.PrimaryHDU(np.ones((5, 8, 8), np.float32), header=w.to_header()).writeto(tmp_path / "obj.fits")
    c = read_one(tmp_path / "obj.fits")
    assert (c.ra, c.dec) == pytest.approx((150.0, 2.0))


def test_directory_in_name_order_skips_subdirectories(tmp_path):
    for name in ["b.fits", "a.fits", "c.fits"]:
        write_cube(tmp_path / name)
    (tmp_path / "nested").mkdir()
    write_cube(tmp_path / "nested" / "d.fits")
    items = list(iter_source(str(tmp_path), bands=5, shape=(8, 8)))
    assert [i.object_id for i in items] == ["a", "b", "c"]
    assert count_items(str(tmp_path)) == 3


def test_missing_source_raises(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list(iter_source(str(tmp_path / "nowhere"), bands=5, shape=None))


# ---- FITS tile + catalog ---------------------------------------------------------------------
def _wcs(crpix=(50.0, 40.0)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


@pytest.fixture
def tile(tmp_path):
    """A 80 x 100 tile whose pixel value encodes its position, 1000 * y + x, and its WCS."""
    y, x = np.mgrid[:80, :100]
    data = (1000 * y + x).astype(np.float32)
    fits.PrimaryHDU(data, header=_wcs().to_header()).writeto(tmp_path / "tile.fits")
    return tmp_path / "tile.fits", data, _wcs()


def test_tile_with_csv_ra_dec_cuts_centred_cutouts(tmp_path, tile):
    path, data, w = tile
    xs, ys = np.array([30, 60, 50]), np.array([20, 40, 75])
    ra, dec = w.pixel_to_world_values(xs, ys)
    lines = ["id,ra,dec"] + [f"src{i},{float(r)!r},{float(d)!r}" for i, (r, d) in enumerate(zip(ra, dec))]
    (tmp_path / "cat.csv").write_text("\n".join(lines) + "\n")
    items = list(iter_source(str(path), bands=1, shape=None, catalog=str(tmp_path / "cat.csv"), cutout_size=15))
    good = [i for i in items if isinstance(i, Cutout)]
    assert [c.object_id for c in good] == ["src0", "src1"]
    for c, x, y, r, d in zip(good, xs, ys, ra, dec):
        assert c.pixels.shape == (1, 15, 15)
        assert c.pixels[0, 7, 7] == 1000 * y + x  # the object sits at the cutout's centre
        np.testing.assert_array_equal(c.pixels[0], data[y - 7:y + 8, x - 7:x + 8])
        assert (c.ra, c.dec) == (r, d)
    edge = items[2]
    assert isinstance(edge, Rejected) and edge.object_id == "src2"
    assert "within 7 px of the tile edge" in edge.reason and "catalog row 2" in edge.reason
    assert count_items(str(path), str(tmp_path / "cat.csv")) == 3


def test_tile_cube_with_fits_table_of_pixel_positions(tmp_path):
    y, x = np.mgrid[:60, :70]
    cube = np.stack([(1000 * y + x) + 1e6 * b for b in range(3)]).astype(">f4")
    w = _wcs()
    fits.PrimaryHDU(cube, header=w.to_header()).writeto(tmp_path / "cube.fits")
    cat = Table({"OBJID": [11, 12, 13, 14], "X": [20.0, 35.0, 2.0, 500.0], "Y": [30.0, 25.0, 30.0, 30.0]})
    cat.write(tmp_path / "cat.fits")
    items = list(iter_source(str(tmp_path / "cube.fits"), bands=3, shape=(9, 9), catalog=str(tmp_path / "cat.fits")))
    a, b, near, outside = items
    assert (a.object_id, b.object_id) == ("11", "12")
    assert a.pixels.shape == (3, 9, 9)
    np.testing.assert_array_equal(a.pixels[:, 4, 4], [30 * 1000 + 20 + 1e6 * k for k in range(3)])
    assert (a.ra, a.dec) == pytest.approx(tuple(float(v) for v in w.pixel_to_world_values(20.0, 30.0)))
    assert isinstance(near, Rejected) and "within 4 px of the tile edge" in near.reason
    assert isinstance(outside, Rejected) and "outside the 70x60 tile" in outside.reason
    assert count_items(str(tmp_path / "cube.fits"), str(tmp_path / "cat.fits")) == 4


def test_tile_without_wcs_needs_pixel_columns(tmp_path):
    fits.PrimaryHDU(np.ones((40, 40), np.float32)).writeto(tmp_path / "tile.fits")
    (tmp_path / "cat.csv").write_text("ra,dec\n150,2\n")
    with pytest.raises(InputError, match="no celestial WCS"):
        list(iter_source(str(tmp_path / "tile.fits"), bands=1, shape=None, catalog=str(tmp_path / "cat.csv"),
                         cutout_size=9))
    (tmp_path / "xy.csv").write_text("x,y\n20,20\n")
    (c,) = iter_source(str(tmp_path / "tile.fits"), bands=1, shape=None, catalog=str(tmp_path / "xy.csv"),
                       cutout_size=9)
    assert c.object_id == "tile-0" and np.isnan(c.ra)


def test_catalog_without_positions_raises(tmp_path, tile):
    (tmp_path / "cat.csv").write_text("name,mag\na,20\n")
    with pytest.raises(InputError, match="ra, dec .* or x, y"):
        list(iter_source(str(tile[0]), bands=1, shape=None, catalog=str(tmp_path / "cat.csv"), cutout_size=9))


def test_catalog_rows_with_bad_positions_are_rejected(tmp_path, tile):
    (tmp_path / "cat.csv").write_text("id,x,y\nok,50,40\nbad,fifty,40\nnan,nan,40\n")
    ok, bad, nan = iter_source(str(tile[0]), bands=1, shape=None, catalog=str(tmp_path / "cat.csv"), cutout_size=9)
    assert isinstance(ok, Cutout)
    assert "is not a number" in bad.reason and "not finite" in nan.reason


def test_unreadable_tile_is_one_rejection(tmp_path):
    (tmp_path / "tile.fits").write_bytes(b"junk" * 1000)
    (tmp_path / "cat.csv").write_text("x,y\n1,1\n")
    (r,) = iter_source(str(tmp_path / "tile.fits"), bands=1, shape=None, catalog=str(tmp_path / "cat.csv"),
                       cutout_size=9)
    assert isinstance(r, Rejected) and r.reason.startswith("unreadable FITS tile")


# ---- arrays ----------------------------------------------------------------------------------
def test_npy_ids_come_from_the_stem(tmp_path):
    images = np.random.default_rng(0).random((3, 2, 8, 8))
    images[1] = np.nan
    np.save(tmp_path / "batch.npy", images)
    items = list(iter_source(str(tmp_path / "batch.npy"), bands=2, shape=(8, 8)))
    assert [i.object_id for i in items] == ["batch-0", "batch-1", "batch-2"]
    assert isinstance(items[1], Rejected) and items[1].reason.startswith("all-NaN")
    np.testing.assert_array_equal(items[2].pixels, images[2].astype(np.float32))
    assert count_items(str(tmp_path / "batch.npy")) == 3


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_with_ids_and_positions(tmp_path, save):
    images = np.arange(4 * 2 * 8 * 8, dtype=">f8").reshape(4, 2, 8, 8)
    save(tmp_path / "b.npz", images=images, ids=np.array(["w", "x", "y", "z"]), ra=np.arange(4.0), dec=-np.arange(4.0))
    items = list(iter_source(str(tmp_path / "b.npz"), bands=2, shape=(8, 8)))
    assert [(c.object_id, c.ra, c.dec) for c in items] == [("w", 0, 0), ("x", 1, -1), ("y", 2, -2), ("z", 3, -3)]
    np.testing.assert_array_equal(items[3].pixels, images[3])
    assert count_items(str(tmp_path / "b.npz")) == 4


def test_npz_problems_are_whole_source_rejections(tmp_path):
    np.savez(tmp_path / "noimg.npz", pixels=np.ones((2, 1, 8, 8)))
    np.savez(tmp_path / "badids.npz", images=np.ones((2, 1, 8, 8)), ids=np.array(["a"]))
    np.save(tmp_path / "flat.npy", np.ones((2, 8, 8)))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    reasons = {p: rejected_reason(tmp_path / p, bands=1) for p in ["noimg.npz", "badids.npz", "flat.npy", "junk.npy"]}
    assert reasons["noimg.npz"] == "no 'images' array in .npz (has: pixels)"
    assert reasons["badids.npz"] == "'ids' has 1 entries, 'images' 2: they must align"
    assert reasons["flat.npy"].endswith("add a band axis: a[:, None]")
    assert reasons["junk.npy"].startswith("unreadable .npy")


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_is_read_in_blocks_without_losing_rows(tmp_path, order):
    from infra.readers import _iter_npy, _Spec, _Validator

    spec = _Spec(n_bands=2, names=None, shape=(5, 5))
    images = np.asarray(np.random.default_rng(1).random((7, 2, 5, 5)), order=order)
    np.save(tmp_path / "many.npy", images)
    # 3 rows per block: blocks of 3, 3, 1 (a block edge inside the array and a short last block)
    items = list(_iter_npy(tmp_path / "many.npy", spec, _Validator(spec), block_bytes=3 * 2 * 5 * 5 * 8))
    assert [i.object_id for i in items] == [f"many-{k}" for k in range(7)]
    np.testing.assert_array_equal(np.stack([i.data for i in items]), images)


def test_truncated_npy_is_rejected_whole(tmp_path):
    np.save(tmp_path / "cut.npy", np.ones((4, 1, 8, 8)))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])
    reason = rejected_reason(tmp_path / "cut.npy", bands=1)
    assert reason.startswith("unreadable .npy") and "truncated" in reason


def test_a_reader_process_that_dies_is_a_clear_error_not_a_traceback():
    """A reader process killed mid-batch (out of memory, a crashing decompressor): one gsafe error
    saying where and what to do; rows appended before it stay, a re-run skips them."""
    import os

    from infra.readers import _in_processes, _Spec

    with pytest.raises(InputError, match="a reader process died while reading these inputs; ingest again with "
                                         "--workers 1"):
        list(_in_processes(os._exit, iter([3]), _Spec(1, None, (8, 8)), 1))  # the worker calls os._exit(3)
