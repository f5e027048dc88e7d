"""Hostile input never stops an ingest: each case is one quarantined item with its reason, the rest
goes in, memory stays bounded whatever a header or a count promises, and a re-run adds nothing."""

from __future__ import annotations

import gzip
import io
import os
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from infra.ingest import ingest
from infra.readers import Cutout, Rejected, iter_source
from infra.settings import Settings
from infra.store import SurveyStore

BANDS = ("g", "r", "i", "z", "y")
SHAPE = (5, 8, 8)


def settings(tmp_path: Path, **kw) -> Settings:
    return Settings(**{"home": tmp_path / "home", "chunk_size": 4, "cutout_size": 8, "progress": False, **kw})


def write_cube(path: Path, objid: str, seed: int = 0, shape=SHAPE) -> bytes:
    hdu = fits.PrimaryHDU(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    hdu.header["OBJID"] = objid
    hdu.writeto(path)
    return path.read_bytes()


def peak_mib(fn) -> float:
    """Peak Python/numpy heap while `fn` runs, MiB (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.fixture
def tile(tmp_path) -> Path:
    y, x = np.mgrid[:40, :50]
    fits.PrimaryHDU((1000 * y + x).astype(np.float32)).writeto(tmp_path / "tile.fits")
    return tmp_path / "tile.fits"


def ingest_tile(tmp_path, tile, catalog: Path):
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(tile), url, settings=settings(tmp_path, bands=("r",), cutout_size=9),
                     catalog=str(catalog), progress=False)
    return summary, SurveyStore.open(url)


def reasons(store: SurveyStore) -> list[str]:
    return list(store.read_quarantine()["reason"])


# ---- the cases of the issue -------------------------------------------------------------------
def test_catalog_row_at_1e300_is_one_quarantined_row(tmp_path, tile):
    (tmp_path / "cat.csv").write_text("id,x,y\na,20,20\nfar,1e300,1e300\nb,30,15\nneg,-1e300,5\n")
    summary, s = ingest_tile(tmp_path, tile, tmp_path / "cat.csv")
    assert (summary.ingested, summary.quarantined) == (2, 2)
    assert list(s.object_ids()) == ["a", "b"]
    assert reasons(s)[0] == "catalog row 1: pixel (x, y) = (1e+300, 1e+300) is outside the 50x40 tile"


def test_latin1_catalog_quarantines_the_rows_it_cannot_read(tmp_path, tile):
    (tmp_path / "cat.csv").write_bytes("id,x,y\ngalaxié,20,20\nb,30,15\n".encode("latin-1"))
    summary, s = ingest_tile(tmp_path, tile, tmp_path / "cat.csv")
    assert (summary.ingested, summary.quarantined) == (1, 1)
    assert list(s.object_ids()) == ["b"]
    assert reasons(s) == ["catalog row 0: not UTF-8 text (byte 0xe9); save the catalog as UTF-8"]


def test_utf8_catalog_with_byte_order_mark_and_non_ascii_ids(tmp_path, tile):
    (tmp_path / "cat.csv").write_text("id,x,y\ngalaxié-Ω,20,20\n", encoding="utf-8-sig")
    summary, s = ingest_tile(tmp_path, tile, tmp_path / "cat.csv")
    assert summary.ingested == 1 and list(s.object_ids()) == ["galaxié-Ω"]


def test_ids_with_control_characters_are_quarantined(tmp_path, tile):
    (tmp_path / "cat.csv").write_bytes(b'id,x,y\na\x00b,20,20\n"two\nlines",25,25\nok,30,15\n')
    summary, s = ingest_tile(tmp_path, tile, tmp_path / "cat.csv")
    assert (summary.ingested, summary.quarantined) == (1, 2) and list(s.object_ids()) == ["ok"]
    assert reasons(s) == ["catalog row 0: object id 'a\\x00b' holds control characters",
                          "catalog row 1: object id 'two\\nlines' holds control characters"]


@pytest.mark.parametrize("damage", ["garbage", "tfields"])
def test_broken_fits_catalog_is_one_clear_error(tmp_path, tile, damage):
    """The catalog is the command line's own input: unusable, it is an error that says so (never a
    traceback, never a loop over 2^31 columns)."""
    from infra.errors import InputError

    Table({"id": ["a"], "x": [20.0], "y": [20.0]}).write(tmp_path / "cat.fits")
    data = bytearray((tmp_path / "cat.fits").read_bytes())
    if damage == "garbage":
        data[:2880] = b"x" * 2880
    else:
        i = data.index(b"TFIELDS =")
        data[i:i + 80] = f"{'TFIELDS':8}= {2**31:>20}".ljust(80).encode()
    (tmp_path / "cat.fits").write_bytes(bytes(data))
    with pytest.raises(InputError, match="unreadable FITS catalog: (not a FITS file|invalid FITS header: TFIELDS)"):
        ingest_tile(tmp_path, tile, tmp_path / "cat.fits")


def test_catalog_field_over_128_kb_is_one_quarantined_row(tmp_path, tile):
    big = "x" * 200_000
    (tmp_path / "cat.csv").write_text(f"id,x,y\na,20,20\n{big},30,15\nb,30,15\n\"{big}\",25,25\n")
    summary, s = ingest_tile(tmp_path, tile, tmp_path / "cat.csv")
    assert (summary.ingested, summary.quarantined) == (2, 2)
    assert list(s.object_ids()) == ["a", "b"]
    assert all(r.startswith("catalog line") and "longer than" in r for r in reasons(s)), reasons(s)


def test_catalog_line_of_gigabytes_is_read_in_bounded_memory(tmp_path, tile):
    with open(tmp_path / "cat.csv", "w") as f:
        f.write("id,x,y\n")
        f.write("y" * (12 << 20))  # one 12 MB line: never held whole
        f.write(",1,1\na,20,20\n")
    summary = None

    def run():
        nonlocal summary
        summary, _ = ingest_tile(tmp_path, tile, tmp_path / "cat.csv")

    assert peak_mib(run) < 10
    assert (summary.ingested, summary.quarantined) == (1, 1)


def test_npz_id_with_a_lone_surrogate_is_one_quarantined_row(tmp_path):
    images = np.random.default_rng(0).normal(size=(3, 5, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "b.npz", images=images, ids=np.array(["a", "b\ud800", "c"]))
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(tmp_path / "b.npz"), url, settings=settings(tmp_path), progress=False)
    assert (summary.ingested, summary.quarantined) == (2, 1)
    s = SurveyStore.open(url)
    assert list(s.object_ids()) == ["a", "c"]
    q = s.read_quarantine()
    assert q["object_id"][0] == "b\\ud800"
    assert q["reason"][0] == "object id 'b\\ud800' is not valid Unicode text (lone surrogate)"


def test_npy_with_zero_size_dimension_and_huge_count_is_one_row(tmp_path):
    with open(tmp_path / "empty.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10**15, 0, 8, 8)})
    url = str(tmp_path / "s.zarr")
    SurveyStore.create(url, bands=BANDS, height=8, width=8, chunk_size=4)
    summary = ingest(str(tmp_path / "empty.npy"), url, settings=settings(tmp_path), progress=False)
    assert (summary.ingested, summary.quarantined) == (0, 1)
    assert reasons(SurveyStore.open(url)) == ["array of 1000000000000000 cutouts of 0 bands, 8x8 px holds no pixels"]


def test_npy_with_zero_size_dimension_in_a_new_store_raises_no_usable_cutout(tmp_path):
    with open(tmp_path / "empty.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**15, 5, 0, 8)})
    with pytest.raises(Exception, match="no usable cutout"):
        ingest(str(tmp_path / "empty.npy"), str(tmp_path / "s.zarr"), settings=settings(tmp_path), progress=False)


def test_npy_rows_of_another_shape_are_one_rejection_read_from_the_header(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((50, 3, 64, 64), np.float32))
    (item,) = iter_source(str(tmp_path / "big.npy"), bands=BANDS, shape=(8, 8))
    assert isinstance(item, Rejected) and item.reason == "3 bands, store has 5 (g,r,i,z,y) (all 50 cutouts of the array)"


def test_tile_compressed_bomb_is_rejected_from_its_header(tmp_path):
    """4000×4000 zeros in one GZIP tile: 37 KB that inflate 850× (32 MB as int16, 64 MB as float32),
    rejected from the header before a pixel is inflated."""
    zeros = np.zeros((4000, 4000), np.int16)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(zeros, compression_type="GZIP_1", tile_shape=zeros.shape)]
                 ).writeto(tmp_path / "bomb.fits.fz")
    assert os.path.getsize(tmp_path / "bomb.fits.fz") * 800 < zeros.nbytes
    del zeros
    items = []
    peak = peak_mib(lambda: items.extend(iter_source(str(tmp_path / "bomb.fits.fz"), bands=BANDS, shape=(8, 8))))
    (item,) = items
    assert isinstance(item, Rejected) and item.reason.startswith("1 bands, store has 5")
    assert peak < 8, peak  # the image would take 32 MB as int16, 64 MB as float32


def test_gzip_bomb_is_rejected_before_it_inflates(tmp_path):
    """A gzipped FITS cutout that inflates 1000×: a 2000×2000 float32 image of zeros (16 MB) in 16 KB."""
    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((2000, 2000), np.float32)).writeto(buf)
    (tmp_path / "bomb.fits.gz").write_bytes(gzip.compress(buf.getvalue()))
    assert os.path.getsize(tmp_path / "bomb.fits.gz") * 500 < len(buf.getvalue())
    items = []
    peak = peak_mib(lambda: items.extend(iter_source(str(tmp_path / "bomb.fits.gz"), bands=BANDS, shape=(8, 8))))
    (item,) = items
    assert isinstance(item, Rejected) and "inflates past" in item.reason, item
    assert peak < 8, peak


def test_fits_with_megabytes_of_trailing_padding_reads_in_bounded_memory(tmp_path):
    data = write_cube(tmp_path / "a.fits", "a")
    (tmp_path / "a.fits").write_bytes(data + b"\0" * (30 << 20))
    items = []
    peak = peak_mib(lambda: items.extend(iter_source(str(tmp_path / "a.fits"), bands=BANDS, shape=(8, 8))))
    (item,) = items
    assert isinstance(item, Cutout) and item.object_id == "a"
    assert peak < 8, peak


def test_header_promising_terabytes_is_truncated_not_read(tmp_path):
    data = bytearray(write_cube(tmp_path / "a.fits", "a"))
    i = data.index(b"NAXIS1  =")
    data[i:i + 80] = f"{'NAXIS1':8}= {10**12:>20}".ljust(80).encode()
    (tmp_path / "a.fits").write_bytes(bytes(data))
    (item,) = iter_source(str(tmp_path / "a.fits"), bands=None, shape=None)
    assert isinstance(item, Rejected) and item.reason.startswith("truncated:")


# ---- file-system oddities ---------------------------------------------------------------------
def test_file_system_oddities_are_one_quarantine_row_each_and_a_rerun_adds_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_cube(src / f"good{i}.fits", f"good{i}", seed=i)
    (src / "empty.fits").write_bytes(b"")
    (src / "folder.fits").mkdir()
    (src / "loop.fits").symlink_to(src / "loop.fits")
    (src / "dangling.fits").symlink_to(tmp_path / "nowhere.fits")
    os.mkfifo(src / "pipe.fits")
    (src / "nested").mkdir()  # a plain subdirectory: not an input
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(src), url, settings=settings(tmp_path), progress=False)
    assert (summary.ingested, summary.quarantined) == (3, 5)
    q = SurveyStore.open(url).read_quarantine()
    got = {Path(s).name: r for s, r in zip(q["source"], q["reason"])}
    assert got == {
        "empty.fits": "empty file (0 bytes): not a FITS file",
        "folder.fits": "a directory, not a FITS file; ingest it on its own: gsafe ingest DIR",
        "loop.fits": "a symbolic link that loops back on itself",
        "dangling.fits": f"a symbolic link to {tmp_path / 'nowhere.fits'}, which does not exist",
        "pipe.fits": "not a regular file (a named pipe): not read",
    }
    again = ingest(str(src), url, settings=settings(tmp_path), progress=False)
    assert (again.ingested, again.skipped, again.already_quarantined) == (0, 3, 5)
    assert len(SurveyStore.open(url).read_quarantine()["reason"]) == 5


def test_file_names_that_are_not_utf8_are_stored_escaped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_cube(src / "good.fits", "good")
    bad_name = os.fsdecode(b"caf\xe9.fits")  # a Latin-1 name on a UTF-8 file system
    (src / bad_name).write_bytes(b"junk")
    url = str(tmp_path / "s.zarr")
    summary = ingest(str(src), url, settings=settings(tmp_path), progress=False)
    assert (summary.ingested, summary.quarantined) == (1, 1)
    (source,) = SurveyStore.open(url).read_quarantine()["source"]
    assert source.endswith("caf\\udce9.fits")


# ---- fuzzing: whatever the bytes, one item per file and never an exception ----------------------
_CARDS = ["NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "BITPIX", "OBJID", "BSCALE", "BZERO", "SIMPLE"]
_VALUES = ["NaN", "inf", "-inf", "-5", "0", "1e300", "'x'", "99999999999999", "'ga\xe9'", "T", "", "-0.0",
           "'" + "z" * 60 + "'"]
_mutation = st.one_of(
    st.tuples(st.just("card"), st.sampled_from(_CARDS), st.sampled_from(_VALUES)),
    st.tuples(st.just("cut"), st.integers(0, 6000)),
    st.tuples(st.just("flip"), st.integers(0, 2879), st.integers(0, 255)),
)


def _mutate(data: bytes, mutation) -> bytes:
    data = bytearray(data)
    if mutation[0] == "card":
        _, key, value = mutation
        i = data.find(f"{key:8}=".encode())
        if i >= 0:
            data[i:i + 80] = f"{key:8}= {value:>20}".ljust(80)[:80].encode("latin-1")
    elif mutation[0] == "cut":
        data = data[: mutation[1]]
    elif mutation[1] < len(data):
        data[mutation[1]] = mutation[2]
    return bytes(data)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(_mutation, min_size=1, max_size=3), gz=st.booleans())
def test_fuzzed_headers_never_stop_an_ingest(mutations, gz):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        good = write_cube(src / "a_good.fits", "good")
        data = good
        for m in mutations:
            data = _mutate(data, m)
        (src / ("b_fuzzed.fits.gz" if gz else "b_fuzzed.fits")).write_bytes(gzip.compress(data) if gz else data)
        url = str(tmp / "s.zarr")
        summary = ingest(str(src), url, settings=settings(tmp), progress=False)
        assert summary.ingested + summary.quarantined + summary.skipped == 2
        s = SurveyStore.open(url)
        assert "good" in set(s.object_ids())
        assert len(s.read_quarantine()["reason"]) == summary.quarantined
        again = ingest(str(src), url, settings=settings(tmp), progress=False)
        # nothing new: rejected again as already recorded, or skipped unread when its id is in the store
        assert again.ingested == 0 and again.quarantined == again.already_quarantined and again.total == 2
        assert len(SurveyStore.open(url).read_quarantine()["reason"]) == summary.quarantined
