"""The formats surveys ship: gzip and tile-compressed FITS, HSC-style per-band MEF cutouts, cubes with an
inverse-variance HDU, tiles with weight maps, and astropy's own compressed images of M13.

Every file is written here by astropy (or is astropy's test data), so each test knows the answer.
"""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from pathlib import Path

import astropy
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from infra.ingest import ingest
from infra.readers import Cutout, Rejected, iter_source
from infra.settings import Settings
from infra.store import SurveyStore

BANDS = ("g", "r", "i", "z", "y")
# LSST/HSC mask planes as HSC cutouts name them in the MASK header (MP_<name> = bit)
HSC_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "DETECTED_NEGATIVE": 6,
              "SUSPECT": 7, "NO_DATA": 8}
M13_DIR = Path(astropy.__file__).parent / "io" / "fits" / "hdu" / "compressed" / "tests" / "data"
M13_FILES = ["m13.fits", "m13_rice.fits", "m13_gzip.fits", "m13_hcomp.fits", "m13_plio.fits"]


def settings(tmp_path: Path, **kw) -> Settings:
    return Settings(**{"home": tmp_path / "home", "chunk_size": 4, "cutout_size": 8, "progress": False, **kw})


def quarantine(url: str) -> dict[str, str]:
    q = SurveyStore.open(url).read_quarantine()
    return {Path(s).name: r for s, r in zip(q["source"], q["reason"])}


def cube(seed: int, shape=(5, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---- gzip and tile compression ----------------------------------------------------------------
def test_gzipped_fits_cutouts_are_ingested_not_called_truncated(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        hdu = fits.PrimaryHDU(cube(i))
        hdu.header["OBJID"] = f"obj{i}"
        hdu.writeto(src / f"obj{i}.fits.gz")
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(src), url, settings=settings(tmp_path), progress=False)
    assert (summary.ingested, summary.quarantined) == (3, 0), quarantine(url)
    s = SurveyStore.open(url)
    assert list(s.object_ids()) == ["obj0", "obj1", "obj2"]
    np.testing.assert_array_equal(s.read_images(), np.stack([cube(i) for i in range(3)]))


def test_gzipped_file_cut_short_is_truncated(tmp_path):
    fits.PrimaryHDU(cube(0)).writeto(tmp_path / "a.fits.gz")
    data = (tmp_path / "a.fits.gz").read_bytes()
    (tmp_path / "a.fits.gz").write_bytes(data[: len(data) // 2])
    (item,) = iter_source(str(tmp_path / "a.fits.gz"), bands=BANDS, shape=(8, 8))
    assert isinstance(item, Rejected) and "truncated" in item.reason and "fetch the file again" in item.reason


@pytest.mark.parametrize("compression", ["RICE_1", "GZIP_1", "GZIP_2", "HCOMPRESS_1", "PLIO_1"])
def test_tile_compressed_cutouts_read_losslessly(tmp_path, compression):
    """fpack-style `.fits.fz`: a compressed image HDU (integers: every algorithm is lossless on them)."""
    data = np.random.default_rng(3).integers(0, 1000, (5, 8, 8)).astype(np.int32)
    if compression in ("HCOMPRESS_1", "PLIO_1"):  # 2-D tiles only: one compressed HDU per band
        hdus = [fits.CompImageHDU(data[b], compression_type=compression, name=BANDS[b]) for b in range(5)]
    else:
        hdus = [fits.CompImageHDU(data, compression_type=compression)]
    fits.HDUList([fits.PrimaryHDU()] + hdus).writeto(tmp_path / "obj.fits.fz")
    (item,) = iter_source(str(tmp_path / "obj.fits.fz"), bands=BANDS, shape=(8, 8))
    assert isinstance(item, Cutout), item
    np.testing.assert_array_equal(item.pixels, data.astype(np.float32))


def test_rice_compressed_tile_with_catalog(tmp_path):
    y, x = np.mgrid[:60, :70]
    tile = (1000 * y + x).astype(np.int32)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(tile, compression_type="RICE_1")]).writeto(
        tmp_path / "tile.fits.fz")
    (tmp_path / "cat.csv").write_text("id,x,y\na,20,30\nb,40,15\n")
    items = list(iter_source(str(tmp_path / "tile.fits.fz"), bands=1, shape=(9, 9), catalog=str(tmp_path / "cat.csv")))
    assert [type(i).__name__ for i in items] == ["Cutout", "Cutout"]
    np.testing.assert_array_equal(items[0].pixels[0], tile[26:35, 16:25])
    np.testing.assert_array_equal(items[1].pixels[0], tile[11:20, 36:45])


# ---- astropy's real compressed images of M13 --------------------------------------------------
@pytest.fixture(scope="module")
def m13() -> np.ndarray:
    if not all((M13_DIR / f).exists() for f in M13_FILES):
        pytest.skip("astropy's compressed M13 test images are not installed")
    return fits.getdata(M13_DIR / "m13.fits").astype(np.float32)


def test_m13_in_every_compression_ingests_as_cutouts_with_nothing_quarantined(tmp_path, m13):
    src = tmp_path / "m13"
    src.mkdir()
    for f in M13_FILES:
        shutil.copy(M13_DIR / f, src / f)
    with open(M13_DIR / "m13.fits", "rb") as fin, gzip.open(src / "m13_whole_file.fits.gz", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(src), url, settings=settings(tmp_path, bands=("r",), cutout_size=300), progress=False)
    assert (summary.ingested, summary.quarantined) == (6, 0), quarantine(url)
    images = SurveyStore.open(url).read_images()
    for row in images:
        # every algorithm astropy wrote these with is lossless on M13's 16-bit integers
        np.testing.assert_array_equal(row[0], m13)


@pytest.mark.parametrize("name", M13_FILES)
def test_m13_as_a_tile_with_a_catalog(tmp_path, m13, name):
    w = WCS(fits.getheader(M13_DIR / "m13.fits"))
    ra, dec = (float(v) for v in w.pixel_to_world_values(150.0, 120.0))
    ra_edge, dec_edge = (float(v) for v in w.pixel_to_world_values(2.0, 2.0))
    (tmp_path / "cat.csv").write_text(f"id,ra,dec\nm13core,{ra!r},{dec!r}\nedge,{ra_edge!r},{dec_edge!r}\n")
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(M13_DIR / name), url, settings=settings(tmp_path, bands=("r",), cutout_size=31),
                     catalog=str(tmp_path / "cat.csv"), progress=False)
    assert (summary.ingested, summary.quarantined) == (1, 1)
    s = SurveyStore.open(url)
    np.testing.assert_array_equal(s.read_images()[0, 0], m13[120 - 15:120 + 16, 150 - 15:150 + 16])
    assert "tile edge" in quarantine(url)[name]


# ---- HSC-style cutouts: PRIMARY + IMAGE / MASK / VARIANCE, one file per band ----------------------
def write_hsc(path: Path, objid: str | None, band: str, seed: int, mask: np.ndarray | None = None,
              variance: np.ndarray | None = None, shape=(8, 8)) -> np.ndarray:
    """One band of one object as the HSC cutout service writes it; returns the image."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    primary = fits.PrimaryHDU()
    primary.header["FILTER"] = f"HSC-{band.upper()}"
    if objid is not None:
        primary.header["OBJID"] = objid
    m = fits.ImageHDU(np.zeros(shape, np.int32) if mask is None else mask, name="MASK")
    for plane, bit in HSC_PLANES.items():
        m.header[f"HIERARCH MP_{plane}"] = bit  # as HSC writes them
    v = fits.ImageHDU(np.full(shape, 0.25, np.float32) if variance is None else variance, name="VARIANCE")
    fits.HDUList([primary, fits.ImageHDU(image, name="IMAGE"), m, v]).writeto(path)
    return image


@pytest.fixture
def hsc_dir(tmp_path):
    """3 objects × 5 bands, files named band first (an object's files are not adjacent); obj2 has no y file.
    obj0's g band has a saturated pixel (masked) and a detected one (kept)."""
    d = tmp_path / "hsc"
    d.mkdir()
    truth: dict[str, dict[str, np.ndarray]] = {}
    variances: dict[str, dict[str, np.ndarray]] = {}
    for bi, band in enumerate(BANDS):
        for o in range(3):
            if o == 2 and band == "y":
                continue
            mask = np.zeros((8, 8), np.int32)
            if o == 0 and band == "g":
                mask[1, 1] = 1 << HSC_PLANES["SAT"]
                mask[2, 2] = 1 << HSC_PLANES["DETECTED"]
            var = np.full((8, 8), 0.1 * (bi + 1) + o, np.float32)
            img = write_hsc(d / f"cutout-HSC-{band.upper()}-obj{o}.fits", f"obj{o}", band, seed=10 * o + bi,
                            mask=mask, variance=var)
            truth.setdefault(f"obj{o}", {})[band] = img
            variances.setdefault(f"obj{o}", {})[band] = var
    return d, truth, variances


def test_hsc_per_band_files_join_into_one_object(tmp_path, hsc_dir):
    d, truth, variances = hsc_dir
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(d), url, settings=settings(tmp_path), progress=False)
    assert (summary.ingested, summary.quarantined) == (2, 1)
    s = SurveyStore.open(url)
    assert s.bands == BANDS and s.image_shape == (5, 8, 8)
    assert sorted(s.object_ids()) == ["obj0", "obj1"]
    for row, oid in enumerate(s.object_ids()):
        expected = np.stack([truth[oid][b] for b in BANDS])
        if oid == "obj0":
            expected[0, 1, 1] = np.nan  # SAT is a missing-pixel bit; DETECTED is not
        np.testing.assert_array_equal(s.read_images(row, row + 1)[0], expected)
        var = s.read_aux("variance", row, row + 1)[0]
        want = np.stack([variances[oid][b] for b in BANDS])
        if oid == "obj0":
            want[0, 1, 1] = np.nan
        np.testing.assert_array_equal(var, want)
    cat = s.read_catalog(["object_id", "n_missing"])
    assert dict(zip(cat["object_id"], cat["n_missing"])) == {"obj0": 1, "obj1": 0}
    mask = s.read_aux("mask")
    assert mask.shape == (2, 5, 8, 8) and mask.dtype == np.int32
    row0 = list(s.object_ids()).index("obj0")
    assert mask[row0, 0, 2, 2] == 1 << HSC_PLANES["DETECTED"]
    (reason,) = [r for r in SurveyStore.open(url).read_quarantine()["reason"]]
    assert reason.startswith("missing band y"), reason


def test_hsc_reingest_adds_nothing_and_quarantines_nothing_twice(tmp_path, hsc_dir):
    d, _, _ = hsc_dir
    url = str(tmp_path / "s.zarr")
    ingest(str(d), url, settings=settings(tmp_path), progress=False)
    again = ingest(str(d), url, settings=settings(tmp_path), progress=False)
    assert (again.ingested, again.skipped, again.already_quarantined) == (0, 2, 1)
    assert len(SurveyStore.open(url).read_quarantine()["reason"]) == 1


def test_hsc_band_of_another_survey_and_duplicate_band_are_quarantined_alone(tmp_path):
    d = tmp_path / "hsc"
    d.mkdir()
    for bi, band in enumerate(BANDS):
        write_hsc(d / f"a-{band}.fits", "a", band, seed=bi)
    write_hsc(d / "a-nb921.fits", "a", "NB0921", seed=9)
    write_hsc(d / "a-z_copy.fits", "a", "z", seed=8)  # sorts after a-z.fits
    items = list(iter_source(str(d), bands=BANDS, shape=(8, 8)))
    good = [i for i in items if isinstance(i, Cutout)]
    bad = {Path(i.source).name: i.reason for i in items if isinstance(i, Rejected)}
    assert len(good) == 1 and good[0].object_id == "a" and good[0].inputs == 5
    assert bad["a-nb921.fits"] == "FILTER 'HSC-NB0921' is none of the store's bands (g,r,i,z,y)"
    assert bad["a-z_copy.fits"] == "a second file for band z of object 'a'; not used"


def test_hsc_id_without_objid_comes_from_the_file_name_less_its_filter(tmp_path):
    for bi, band in enumerate(BANDS):
        write_hsc(tmp_path / f"42-cutout-HSC-{band.upper()}-9813.fits", None, band, seed=bi)
    (item,) = iter_source(str(tmp_path), bands=BANDS, shape=(8, 8))
    assert isinstance(item, Cutout) and item.object_id == "42-cutout-9813"


def test_mask_bits_are_configurable(tmp_path):
    mask = np.zeros((8, 8), np.int32)
    mask[0, 0] = 1 << HSC_PLANES["SAT"]
    mask[0, 1] = 1 << HSC_PLANES["DETECTED"]
    write_hsc(tmp_path / "a.fits", "a", "r", seed=0, mask=mask)
    (default,) = iter_source(str(tmp_path / "a.fits"), bands=("r",), shape=(8, 8))
    (detected,) = iter_source(str(tmp_path / "a.fits"), bands=("r",), shape=(8, 8), mask_bits=("DETECTED", "5"))
    (none,) = iter_source(str(tmp_path / "a.fits"), bands=("r",), shape=(8, 8), mask_bits=())
    assert np.isnan(default.pixels[0, 0, 0]) and np.isfinite(default.pixels[0, 0, 1])
    assert np.isfinite(detected.pixels[0, 0, 0]) and np.isnan(detected.pixels[0, 0, 1])
    assert none.n_missing == 0


# ---- cubes with an inverse-variance HDU (Legacy Survey style) ------------------------------------
def test_cube_with_invvar_hdu_gives_variance_and_zero_weight_is_missing(tmp_path):
    data = cube(1, (3, 8, 8))
    ivar = np.full((3, 8, 8), 4.0, np.float32)
    ivar[2, 3, 3] = 0.0  # no data there
    primary = fits.PrimaryHDU(data)
    primary.header["BANDS"] = "grz"
    primary.header["OBJID"] = "ls-1"
    fits.HDUList([primary, fits.ImageHDU(ivar, name="INVVAR")]).writeto(tmp_path / "ls.fits")
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(tmp_path / "ls.fits"), url, settings=settings(tmp_path, bands=("g", "r", "z")), progress=False)
    assert (summary.ingested, summary.quarantined) == (1, 0)
    s = SurveyStore.open(url)
    img, var = s.read_images()[0], s.read_aux("variance")[0]
    assert np.isnan(img[2, 3, 3]) and np.isnan(var[2, 3, 3])
    ok = np.isfinite(img)
    np.testing.assert_array_equal(img[ok], data[ok])
    np.testing.assert_allclose(var[ok], 0.25)
    assert s.read_catalog(["n_missing"])["n_missing"][0] == 1


def test_cube_bands_named_in_the_header_are_put_in_store_order(tmp_path):
    data = cube(2, (3, 8, 8))
    primary = fits.PrimaryHDU(data)
    primary.header["BANDS"] = "z,r,g"
    primary.writeto(tmp_path / "zrg.fits")
    (item,) = iter_source(str(tmp_path / "zrg.fits"), bands=("g", "r", "z"), shape=(8, 8))
    np.testing.assert_array_equal(item.pixels, data[::-1])
    (other,) = iter_source(str(tmp_path / "zrg.fits"), bands=("g", "r", "i"), shape=(8, 8))
    assert isinstance(other, Rejected) and other.reason == "bands z,r,g (from its header), store has g,r,i"


def test_cutout_without_variance_stores_nan_variance_beside_one_with(tmp_path):
    fits.HDUList([fits.PrimaryHDU(cube(0, (1, 8, 8))), fits.ImageHDU(np.full((1, 8, 8), 2.0, np.float32),
                                                                      name="VARIANCE")]).writeto(tmp_path / "a.fits")
    fits.PrimaryHDU(cube(1, (1, 8, 8))).writeto(tmp_path / "b.fits")
    url = str(tmp_path / "s.zarr")
    ingest(str(tmp_path), url, settings=settings(tmp_path, bands=("r",)), progress=False)
    var = SurveyStore.open(url).read_aux("variance")
    assert (var[0] == 2.0).all() and np.isnan(var[1]).all()


# ---- tiles with weight maps --------------------------------------------------------------------
def test_tile_with_weight_map_gives_variance(tmp_path):
    y, x = np.mgrid[:50, :60]
    sci = (1000 * y + x).astype(np.float32)
    wht = np.full((50, 60), 0.5, np.float32)
    wht[25, 20] = 0.0
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(sci, name="SCI"), fits.ImageHDU(wht, name="WHT")]).writeto(
        tmp_path / "tile.fits")
    (tmp_path / "cat.csv").write_text("id,x,y\na,20,25\nb,40,10\n")
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(tmp_path / "tile.fits"), url, settings=settings(tmp_path, bands=("r",), cutout_size=9),
                     catalog=str(tmp_path / "cat.csv"), progress=False)
    assert (summary.ingested, summary.quarantined) == (2, 0)
    s = SurveyStore.open(url)
    img, var = s.read_images(), s.read_aux("variance")
    assert np.isnan(img[0, 0, 4, 4]) and np.isnan(var[0, 0, 4, 4])  # zero weight: no data
    assert img[1, 0, 4, 4] == 1000 * 10 + 40
    assert (var[1] == 2.0).all()


def test_swarp_weight_file_beside_the_tile(tmp_path):
    sci = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    fits.PrimaryHDU(sci).writeto(tmp_path / "coadd.fits")
    fits.PrimaryHDU(np.full((40, 40), 4.0, np.float32)).writeto(tmp_path / "coadd.weight.fits")
    (tmp_path / "cat.csv").write_text("x,y\n20,20\n")
    (item,) = iter_source(str(tmp_path / "coadd.fits"), bands=1, shape=(9, 9), catalog=str(tmp_path / "cat.csv"))
    assert isinstance(item, Cutout) and (item.variance == 0.25).all()


def test_rice_tile_is_inflated_only_where_it_is_cut(tmp_path):
    """A 2000×2000 Rice tile (16 MB inflated): three cutouts inflate only the rows they need."""
    y, x = np.mgrid[:2000, :2000]
    tile = ((y * 7 + x * 3) % 1000).astype(np.int32)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(tile, compression_type="RICE_1")]).writeto(
        tmp_path / "tile.fits.fz")
    del y, x
    (tmp_path / "cat.csv").write_text("id,x,y\na,100,100\nb,1000,1500\nc,1900,50\n")
    items = []
    tracemalloc.start()
    try:
        items += iter_source(str(tmp_path / "tile.fits.fz"), bands=1, shape=(9, 9), catalog=str(tmp_path / "cat.csv"))
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(items[1].pixels[0], tile[1496:1505, 996:1005])
    assert peak < 6, peak


def test_unusable_weight_file_beside_a_tile_is_named_in_the_reason(tmp_path):
    fits.PrimaryHDU(np.ones((40, 40), np.float32)).writeto(tmp_path / "coadd.fits")
    fits.PrimaryHDU(np.ones((20, 20), np.float32)).writeto(tmp_path / "coadd.weight.fits")
    (tmp_path / "cat.csv").write_text("x,y\n20,20\n")
    (item,) = iter_source(str(tmp_path / "coadd.fits"), bands=1, shape=(9, 9), catalog=str(tmp_path / "cat.csv"))
    assert item.reason == (f"weight map {tmp_path / 'coadd.weight.fits'} beside the tile is unusable "
                           f"(no image of the tile's shape (40, 40)); fix or move it")


@pytest.mark.parametrize("stem, flt, oid", [("42-cutout-HSC-G-9813", "HSC-G", "42-cutout-9813"),
                                            ("galaxy1_g", "HSC-G", "galaxy1"), ("g_obj", "g", "obj"),
                                            ("objg", "g", "objg"), ("cutout-HSC-I2-obj7", "HSC-I2", "cutout-obj7"),
                                            ("a.r", "r DECam SDSS c0002 6415.0 1480.0", "a")])
def test_id_of_a_per_band_file_is_its_name_less_its_filter_between_separators(stem, flt, oid):
    from infra.readers import _id_without_filter

    assert _id_without_filter(stem, flt) == oid
