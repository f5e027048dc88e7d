"""Ingest: good cutouts into the store, broken input into quarantine, idempotent re-runs."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from infra.errors import InputError, StoreError
from infra.ingest import IngestSummary, ingest
from infra.settings import Settings
from infra.store import SurveyStore

BANDS = ("g", "r", "i", "z", "y")
SHAPE = (5, 8, 8)


def write_cube(path: Path, objid: str | None = None, data: np.ndarray | None = None, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).random(SHAPE, dtype=np.float32) if data is None else data
    hdu = fits.PrimaryHDU(data)
    if objid is not None:
        hdu.header["OBJID"] = objid
    hdu.writeto(path)
    return path


@pytest.fixture
def cutout_dir(tmp_path) -> tuple[Path, list[str], dict[str, str]]:
    """6 good cutouts (ids obj0..obj5) and 5 broken files, each with the start of its reason."""
    d = tmp_path / "cutouts"
    d.mkdir()
    good = [f"obj{i}" for i in range(6)]
    for i, oid in enumerate(good):
        write_cube(d / f"good_{i}.fits", oid, seed=i)
    full = (d / "good_0.fits").read_bytes()
    (d / "truncated.fits").write_bytes(full[:-2000])  # into the pixels (a cut padding loses nothing)
    (d / "garbage.fits").write_bytes(np.random.default_rng(9).bytes(3000))
    (d / "README").write_text("cutouts from the night of the 3rd\n")
    write_cube(d / "three_bands.fits", "obj_3b", data=np.ones((3, 8, 8), np.float32))
    write_cube(d / "all_nan.fits", "obj_nan", data=np.full(SHAPE, np.nan, np.float32))
    broken = {"truncated.fits": "truncated", "garbage.fits": "not a FITS file", "README": "not a FITS file",
              "three_bands.fits": "3 bands, store has 5 (g,r,i,z,y)", "all_nan.fits": "all-NaN cutout"}
    return d, good, broken


def test_good_cutouts_ingested_and_broken_ones_quarantined(cutout_dir, tmp_store_url, tmp_settings, caplog):
    d, good, broken = cutout_dir
    caplog.set_level(logging.WARNING, logger="gsafe.ingest")
    summary = ingest(str(d), tmp_store_url, settings=tmp_settings, progress=False)
    assert (summary.ingested, summary.quarantined, summary.skipped) == (6, 5, 0)
    assert summary.line() == "ingest: 6 ingested, 5 quarantined, 0 skipped as already there"

    s = SurveyStore.open(tmp_store_url)
    assert s.bands == BANDS and s.image_shape == SHAPE and s.chunk_size == 4
    assert list(s.object_ids()) == good
    for i in range(6):  # each row holds its own file's pixels
        np.testing.assert_array_equal(s.read_images(i, i + 1)[0], fits.getdata(d / f"good_{i}.fits"))
    assert list(s.read_catalog(["source"])["source"]) == [str(d / f"good_{i}.fits") for i in range(6)]
    assert s.attrs["provenance"][0]["source"] == str(d)

    q = s.read_quarantine()
    reasons = {Path(src).name: reason for src, reason in zip(q["source"], q["reason"])}
    assert set(reasons) == set(broken)
    for name, start in broken.items():
        assert start in reasons[name], (name, reasons[name])
    logged = [r.getMessage() for r in caplog.records if r.name == "gsafe.ingest"]
    assert any(m.startswith(f"ingest: {d / 'three_bands.fits'} (obj_3b): 3 bands") and m.endswith(": quarantined")
               for m in logged), logged


def test_reingest_adds_nothing(cutout_dir, tmp_store_url, tmp_settings):
    d, good, broken = cutout_dir
    ingest(str(d), tmp_store_url, settings=tmp_settings, progress=False)
    before = SurveyStore.open(tmp_store_url).read_quarantine()
    again = ingest(str(d), tmp_store_url, settings=tmp_settings, progress=False)
    assert (again.ingested, again.quarantined, again.skipped, again.already_quarantined) == (0, 5, 6, 5)
    assert again.line() == "ingest: 0 ingested, 5 quarantined (5 of them already recorded), 6 skipped as already there"
    s = SurveyStore.open(tmp_store_url)
    assert s.n == 6 and list(s.object_ids()) == good
    after = s.read_quarantine()
    assert {k: list(v) for k, v in after.items()} == {k: list(v) for k, v in before.items()}


def test_new_files_after_a_first_ingest_are_added(cutout_dir, tmp_store_url, tmp_settings):
    d, good, _ = cutout_dir
    ingest(str(d), tmp_store_url, settings=tmp_settings, progress=False)
    write_cube(d / "later.fits", "obj_later")
    summary = ingest(str(d), tmp_store_url, settings=tmp_settings, progress=False)
    assert (summary.ingested, summary.skipped) == (1, 6)
    assert list(SurveyStore.open(tmp_store_url).object_ids()) == good + ["obj_later"]


def test_duplicate_objid_in_one_run_is_skipped_once(tmp_path, tmp_store_url, tmp_settings):
    for name, oid in [("a.fits", "x"), ("b.fits", "y"), ("c.fits", "x")]:
        write_cube(tmp_path / name, oid)
    summary = ingest(str(tmp_path), tmp_store_url, settings=tmp_settings, progress=False)
    assert (summary.ingested, summary.quarantined, summary.skipped) == (2, 0, 1)
    s = SurveyStore.open(tmp_store_url)
    assert list(s.object_ids()) == ["x", "y"]
    assert list(s.read_catalog(["source"])["source"]) == [str(tmp_path / "a.fits"), str(tmp_path / "b.fits")]
    assert len(s.read_quarantine()["source"]) == 0


def test_appends_fill_the_last_chunk_then_whole_chunks(tmp_path, tmp_store_url, tmp_settings, monkeypatch):
    np.save(tmp_path / "first.npy", np.ones((3, 5, 8, 8), np.float32))
    np.save(tmp_path / "second.npy", np.ones((10, 5, 8, 8), np.float32))
    ingest(str(tmp_path / "first.npy"), tmp_store_url, settings=tmp_settings, progress=False)
    sizes = []
    real = SurveyStore.append
    monkeypatch.setattr(SurveyStore, "append", lambda self, images, *a, **k: sizes.append(len(images))
                        or real(self, images, *a, **k))
    ingest(str(tmp_path / "second.npy"), tmp_store_url, settings=tmp_settings, progress=False)
    assert sizes == [1, 4, 4, 1]  # rows 3 | 4-7 | 8-11 | 12
    assert SurveyStore.open(tmp_store_url).n == 13


def test_n_missing_and_positions_reach_the_catalog(tmp_path, tmp_store_url, tmp_settings):
    images = np.ones((2, 1, 8, 8), np.float32)
    images[1, 0, 0, :5] = np.nan
    np.savez(tmp_path / "b.npz", images=images, ids=np.array(["p", "q"]), ra=np.array([10.0, 11.0]),
             dec=np.array([-1.0, -2.0]))
    ingest(str(tmp_path / "b.npz"), tmp_store_url, settings=tmp_settings, progress=False)
    cat = SurveyStore.open(tmp_store_url).read_catalog(["object_id", "n_missing", "ra", "dec"])
    assert list(cat["n_missing"]) == [0, 5]
    assert list(cat["ra"]) == [10.0, 11.0] and list(cat["dec"]) == [-1.0, -2.0]


def test_band_names_from_settings_only_when_the_count_matches(tmp_path, tmp_settings):
    np.save(tmp_path / "five.npy", np.ones((1, 5, 8, 8), np.float32))
    np.save(tmp_path / "two.npy", np.ones((1, 2, 8, 8), np.float32))
    ingest(str(tmp_path / "five.npy"), str(tmp_path / "five.zarr"), settings=tmp_settings, progress=False)
    ingest(str(tmp_path / "two.npy"), str(tmp_path / "two.zarr"), settings=tmp_settings, progress=False)
    assert SurveyStore.open(str(tmp_path / "five.zarr")).bands == BANDS
    assert SurveyStore.open(str(tmp_path / "two.zarr")).bands == ("b0", "b1")


def test_an_odd_cutout_sorting_first_does_not_shape_the_store(tmp_path, tmp_store_url):
    """A 3-band cube and a smaller stamp that sort before the survey are quarantined, not the survey."""
    d = tmp_path / "c"
    d.mkdir()
    write_cube(d / "a_three_bands.fits", "odd3", data=np.ones((3, 8, 8), np.float32))
    write_cube(d / "b_small.fits", "odd_small", data=np.ones((5, 4, 4), np.float32))
    for i in range(4):
        write_cube(d / f"c_{i}.fits", f"obj{i}", seed=i)
    s = Settings(home=tmp_path / "home", chunk_size=4, cutout_size=8, progress=False)
    summary = ingest(str(d), tmp_store_url, settings=s, progress=False)
    assert (summary.ingested, summary.quarantined) == (4, 2)
    assert SurveyStore.open(tmp_store_url).image_shape == SHAPE


def test_extra_columns_are_written(tmp_path, tmp_store_url, tmp_settings):
    np.save(tmp_path / "c.npy", np.ones((6, 5, 8, 8), np.float32))
    ingest(str(tmp_path / "c.npy"), tmp_store_url, settings=tmp_settings, progress=False,
           extra_columns=lambda batch: {"label": np.array([int(c.object_id[-1]) % 2 for c in batch], np.int8)})
    assert list(SurveyStore.open(tmp_store_url).read_catalog(["label"])["label"]) == [0, 1, 0, 1, 0, 1]


def test_tile_with_catalog_ingests_cutouts_of_settings_size(tmp_path, tmp_store_url):
    fits.PrimaryHDU(np.random.default_rng(0).random((50, 50), dtype=np.float32)).writeto(tmp_path / "tile.fits")
    (tmp_path / "cat.csv").write_text("id,x,y\na,25,25\nb,10,30\nedge,1,1\n")
    settings = Settings(home=tmp_path / "home", chunk_size=4, cutout_size=9, bands=("r",))
    summary = ingest(str(tmp_path / "tile.fits"), tmp_store_url, settings=settings, catalog=str(tmp_path / "cat.csv"),
                     progress=False)
    assert (summary.ingested, summary.quarantined) == (2, 1)
    s = SurveyStore.open(tmp_store_url)
    assert s.image_shape == (1, 9, 9) and s.bands == ("r",) and list(s.object_ids()) == ["a", "b"]
    assert "within 4 px of the tile edge" in s.read_quarantine()["reason"][0]


def test_existing_store_shape_is_enforced(tmp_path, tmp_store_url, tmp_settings):
    SurveyStore.create(tmp_store_url, bands=BANDS, height=16, width=16, chunk_size=4)
    write_cube(tmp_path / "small.fits", "s")
    summary = ingest(str(tmp_path), tmp_store_url, settings=tmp_settings, progress=False)
    assert (summary.ingested, summary.quarantined) == (0, 1)
    assert SurveyStore.open(tmp_store_url).read_quarantine()["reason"][0].startswith("cutout 8x8 px, store has 16x16")


def test_nothing_usable_and_no_store_raises_input_error(tmp_path, tmp_store_url, tmp_settings):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "junk.fits").write_bytes(b"junk")
    with pytest.raises(InputError, match="no usable cutout"):
        ingest(str(tmp_path / "src"), tmp_store_url, settings=tmp_settings, progress=False)
    assert not SurveyStore.exists(tmp_store_url)


def test_missing_store_without_create_raises(tmp_path, tmp_store_url, tmp_settings):
    write_cube(tmp_path / "a.fits", "a")
    with pytest.raises(StoreError, match="not found"):
        ingest(str(tmp_path), tmp_store_url, settings=tmp_settings, progress=False, create=False)


def test_something_else_at_the_store_url_is_left_alone(tmp_path, tmp_store_url, tmp_settings):
    import zarr
    zarr.open_group(tmp_store_url, mode="w", zarr_format=3).attrs["mine"] = True
    write_cube(tmp_path / "a.fits", "a")
    with pytest.raises(StoreError, match="not a gsafe survey store"):
        ingest(str(tmp_path), tmp_store_url, settings=tmp_settings, progress=False)


def test_progress_bar_does_not_change_the_result(cutout_dir, tmp_store_url, tmp_settings, capsys):
    summary = ingest(str(cutout_dir[0]), tmp_store_url, settings=tmp_settings, progress=True)
    assert summary.total == 11
    assert "11/11" in capsys.readouterr().err


def test_summary_line_counts():
    assert IngestSummary(1990, 10, 0).line() == "ingest: 1990 ingested, 10 quarantined, 0 skipped as already there"


# ---- property: whatever the files, ingest accounts for every input ---------------------------
_KINDS = ["good", "good", "good", "nan_heavy", "all_nan", "few_nan", "wrong_bands", "wrong_shape", "garbage",
          "truncated", "text"]
_file_spec = st.tuples(st.sampled_from(_KINDS), st.integers(0, 5), st.integers(0, 2**31 - 1))


def _write_spec(path: Path, kind: str, oid: str, seed: int) -> bool:
    """Write one input file of `kind`; True when ingest should accept it."""
    rng = np.random.default_rng(seed)
    shape = {"wrong_bands": (int(rng.integers(1, 5)), 8, 8),
             "wrong_shape": (5, int(rng.integers(2, 8)), int(rng.integers(9, 12)))}.get(kind, SHAPE)
    data = rng.normal(size=shape).astype(rng.choice([">f4", "<f8", ">i2", "<i4"]))
    if kind in ("nan_heavy", "all_nan", "few_nan") and data.dtype.kind == "i":
        data = data.astype(np.float32)
    n = data.size
    n_nan = {"nan_heavy": int(rng.integers(int(0.25 * n) + 1, n)), "all_nan": n,
             "few_nan": int(rng.integers(1, int(0.25 * n)))}.get(kind, 0)
    if n_nan:
        data.reshape(-1)[rng.permutation(n)[:n_nan]] = rng.choice([np.nan, np.inf, -np.inf])
    if kind == "garbage":
        path.write_bytes(rng.bytes(int(rng.integers(0, 6000))))
    elif kind == "text":
        path.write_text(f"object {oid}\n" * int(rng.integers(0, 50)))
    else:
        write_cube(path, oid, data=data)
        if kind == "truncated":  # cut before the last pixel (a cut in the final padding loses nothing)
            full = path.read_bytes()
            path.write_bytes(full[: int(rng.integers(0, 2880 + data.nbytes))])
    return kind in ("good", "few_nan")


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(_file_spec, min_size=1, max_size=8), store_first=st.booleans())
def test_ingest_accounts_for_every_input(specs, store_first):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        if not store_first:  # the first good cutout shapes a new store: make it one of the expected shape
            specs = [("good", 0, 0)] + specs
        accepted_ids: list[str] = []
        for i, (kind, id_no, seed) in enumerate(specs):
            if _write_spec(src / f"f{i:02d}.fits", kind, f"obj{id_no}", seed):
                accepted_ids.append(f"obj{id_no}")
        url = str(tmp / "s.zarr")
        if store_first:
            SurveyStore.create(url, bands=BANDS, height=8, width=8, chunk_size=4)
        settings = Settings(home=tmp / "home", chunk_size=4, progress=False)
        summary = ingest(str(src), url, settings=settings, progress=False)
        expected = list(dict.fromkeys(accepted_ids))  # first occurrence wins, in file-name order
        assert summary.ingested + summary.quarantined + summary.skipped == len(specs)
        assert summary.ingested == len(expected)
        assert summary.skipped == len(accepted_ids) - len(expected)
        assert summary.quarantined == len(specs) - len(accepted_ids)
        s = SurveyStore.open(url)
        assert list(s.object_ids()) == expected
        assert len(s.read_quarantine()["source"]) == summary.quarantined
        assert np.all(np.isfinite(s.read_images()) | np.isnan(s.read_images()))
        again = ingest(str(src), url, settings=settings, progress=False)
        # nothing new: a broken file is either rejected again (already recorded) or, when its id is
        # already in the store, skipped unread
        assert again.ingested == 0 and again.quarantined == again.already_quarantined
        assert again.total == len(specs)
        assert SurveyStore.open(url).n == len(expected)
        assert len(SurveyStore.open(url).read_quarantine()["source"]) == summary.quarantined


# ---- parallel reading -------------------------------------------------------------------------
def _store_content(url: str) -> tuple:
    s = SurveyStore.open(url)
    q = s.read_quarantine()
    return (list(s.object_ids()), s.read_images(), list(s.read_catalog(["source"])["source"]),
            sorted(zip(q["source"], q["object_id"], q["reason"])))


def test_reader_processes_give_the_same_store_in_the_same_order(cutout_dir, tmp_path):
    """Two reader processes (batches of 4 inputs: several in flight) against reading in this process."""
    d, good, broken = cutout_dir
    for i in range(9):  # more objects than one batch
        write_cube(d / f"more_{i}.fits", f"more{i}", seed=100 + i)
    for b, band in enumerate(BANDS):  # and one object in per-band files, its files in different batches
        primary = fits.PrimaryHDU()
        primary.header["FILTER"], primary.header["OBJID"] = f"HSC-{band.upper()}", "hsc0"
        image = fits.ImageHDU(np.full((8, 8), b, np.float32), name="IMAGE")
        fits.HDUList([primary, image, fits.ImageHDU(np.ones((8, 8), np.float32), name="VARIANCE")]).writeto(
            d / f"{band}_hsc0.fits")
    one = ingest(str(d), str(tmp_path / "one.zarr"), settings=Settings(home=tmp_path / "h", chunk_size=4,
                                                                       ingest_workers=1), progress=False)
    two = ingest(str(d), str(tmp_path / "two.zarr"), settings=Settings(home=tmp_path / "h", chunk_size=4,
                                                                       ingest_workers=2), progress=False)
    assert (one.ingested, one.quarantined) == (two.ingested, two.quarantined) == (16, 5)
    a, b = _store_content(str(tmp_path / "one.zarr")), _store_content(str(tmp_path / "two.zarr"))
    assert a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and "hsc0" in a[0]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(SurveyStore.open(str(tmp_path / "one.zarr")).read_aux("variance"),
                                  SurveyStore.open(str(tmp_path / "two.zarr")).read_aux("variance"))


def test_reader_processes_cut_a_tile_in_catalog_order(tmp_path):
    y, x = np.mgrid[:60, :60]
    fits.PrimaryHDU((1000 * y + x).astype(np.float32)).writeto(tmp_path / "tile.fits")
    rows = [f"o{i},{10 + (7 * i) % 40},{10 + (11 * i) % 40}" for i in range(20)] + ["edge,1,1", "far,1e300,5"]
    (tmp_path / "cat.csv").write_text("id,x,y\n" + "\n".join(rows) + "\n")
    s = Settings(home=tmp_path / "h", chunk_size=4, cutout_size=9, bands=("r",), ingest_workers=2)
    summary = ingest(str(tmp_path / "tile.fits"), str(tmp_path / "s.zarr"), settings=s,
                     catalog=str(tmp_path / "cat.csv"), progress=False)
    assert (summary.ingested, summary.quarantined) == (20, 2)
    store = SurveyStore.open(str(tmp_path / "s.zarr"))
    assert list(store.object_ids()) == [f"o{i}" for i in range(20)]
    centres = store.read_images()[:, 0, 4, 4]
    assert list(centres) == [1000 * (10 + (11 * i) % 40) + 10 + (7 * i) % 40 for i in range(20)]


def test_ingest_task_retries_hiccups_but_not_gsafe_errors():
    """A missing source fails the same way every time: no retries; a file-system hiccup may pass."""
    from prefect.states import Failed

    from tasks.ingest import _worth_retrying

    assert not _worth_retrying(None, None, Failed(data=InputError("src/", "not found")))
    assert _worth_retrying(None, None, Failed(data=OSError("Connection reset by peer")))


def test_hash_set_remembers_across_merges():
    from infra.ingest import _Hashes

    hs = _Hashes(np.array([5, 9], np.uint64), merge_at=3)
    for h in (1, 7, 3, 2**63 + 11):  # the third addition merges the new ones into the sorted array
        hs.add(h)
    assert all(h in hs for h in (1, 3, 5, 7, 9, 2**63 + 11)) and not any(h in hs for h in (0, 2, 8, 2**64 - 1))
    assert list(hs.sorted) == [1, 3, 5, 7, 9] and hs.new == {2**63 + 11}
