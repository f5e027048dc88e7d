"""The survey store: schema, URLs, chunk-aligned appends, crash safety, score tables."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from infra.errors import SchemaVersionError, StoreError
from infra.store import SCHEMA_VERSION, SurveyStore, _write_aligned, id_hash

BANDS = ("g", "r")


def _make(url: str, chunk_size: int = 4) -> SurveyStore:
    return SurveyStore.create(url, bands=BANDS, height=6, width=5, chunk_size=chunk_size, pixel_scale=0.168,
                              provenance={"source": "test"})


def _rows(start: int, stop: int) -> tuple[np.ndarray, dict]:
    """Images whose every pixel is its row number, and matching ids: any misplaced row shows."""
    n = stop - start
    images = np.broadcast_to(np.arange(start, stop, dtype=np.float32)[:, None, None, None], (n, 2, 6, 5)).copy()
    return images, {"object_id": np.array([f"obj{i}" for i in range(start, stop)]),
                    "ra": np.arange(start, stop, dtype=np.float64)}


def test_create_then_open_keeps_attrs(tmp_store_url):
    _make(tmp_store_url)
    s = SurveyStore.open(tmp_store_url)
    assert s.n == 0
    assert s.bands == BANDS
    assert s.image_shape == (2, 6, 5)
    assert s.chunk_size == 4
    assert s.pixel_scale == pytest.approx(0.168)
    assert s.attrs["schema_version"] == SCHEMA_VERSION
    assert s.attrs["provenance"] == [{"source": "test"}]
    assert s.images.chunks == (4, 2, 6, 5)
    assert set(s.columns) >= {"object_id", "id_hash", "ra", "dec", "source", "n_missing"}


def test_create_refuses_an_existing_store(tmp_store_url):
    _make(tmp_store_url)
    with pytest.raises(StoreError, match="already exists"):
        _make(tmp_store_url)


def test_other_schema_version_raises_with_what_to_do(tmp_store_url):
    _make(tmp_store_url).group.attrs["schema_version"] = SCHEMA_VERSION + 98
    with pytest.raises(SchemaVersionError, match=rf"schema version {SCHEMA_VERSION + 98}.*re-ingest"):
        SurveyStore.open(tmp_store_url)
    assert not SurveyStore.exists(tmp_store_url)


@pytest.mark.parametrize("what", ["missing", "empty dir", "plain zarr group", "a file"])
def test_opening_a_non_store_raises_store_error(tmp_path, what):
    url = tmp_path / "thing"
    if what == "empty dir":
        url.mkdir()
    elif what == "plain zarr group":
        zarr.open_group(str(url), mode="w", zarr_format=3).attrs["hello"] = 1
    elif what == "a file":
        url.write_text("not a store")
    with pytest.raises(StoreError, match="thing"):
        SurveyStore.open(str(url))
    assert not SurveyStore.exists(str(url))


def test_opening_a_zarr_array_raises_store_error(tmp_path):
    zarr.create_array(str(tmp_path / "arr.zarr"), shape=(3,), dtype="float32")
    with pytest.raises(StoreError, match="arr.zarr"):
        SurveyStore.open(str(tmp_path / "arr.zarr"))


@pytest.mark.parametrize("kind", ["path", "file", "memory"])
def test_urls_work_through_the_same_code(tmp_path, memory_store_url, kind):
    url = {"path": str(tmp_path / "s.zarr"), "file": (tmp_path / "s.zarr").as_uri(), "memory": memory_store_url}[kind]
    _make(url).append(*_rows(0, 6))
    s = SurveyStore.open(url, mode="r+")
    s.append(*_rows(6, 9))
    s = SurveyStore.open(url)
    assert s.n == 9
    np.testing.assert_array_equal(s.read_images()[:, 0, 0, 0], np.arange(9))
    assert list(s.object_ids()) == [f"obj{i}" for i in range(9)]
    if kind == "file":
        assert SurveyStore.open(str(tmp_path / "s.zarr")).n == 9  # the same bytes as a plain path


def test_write_aligned_never_straddles_a_chunk():
    class Recorder:
        chunks = (4,)

        def __init__(self):
            self.writes = []

        def __setitem__(self, key, value):
            self.writes.append((key.start, key.stop))

    arr = Recorder()
    _write_aligned(arr, 3, np.zeros(10))
    assert arr.writes == [(3, 4), (4, 8), (8, 12), (12, 13)]


def test_appends_across_chunk_boundaries_keep_every_row(tmp_store_url):
    s = _make(tmp_store_url)
    for start, stop in [(0, 3), (3, 4), (4, 11), (11, 12)]:
        assert s.append(*_rows(start, stop)) == (start, stop)
    assert s.n == 12
    np.testing.assert_array_equal(s.read_images()[:, 1, 5, 4], np.arange(12))
    np.testing.assert_array_equal(s.read_catalog(["ra"])["ra"], np.arange(12))
    assert s.chunk_bounds() == [(0, 4), (4, 8), (8, 12)]
    np.testing.assert_array_equal(s.read_rows(np.array([9, 0, 5]))[:, 0, 0, 0], [9, 0, 5])


def test_append_rejects_wrong_shape_and_missing_ids(tmp_store_url):
    s = _make(tmp_store_url)
    with pytest.raises(StoreError, match="shape"):
        s.append(np.zeros((2, 3, 6, 5), np.float32), {"object_id": np.array(["a", "b"])})
    with pytest.raises(StoreError, match="object_id"):
        s.append(np.zeros((2, 2, 6, 5), np.float32), {"ra": np.zeros(2)})
    assert s.n == 0


def test_a_new_column_gets_fill_values_for_earlier_rows(tmp_store_url):
    s = _make(tmp_store_url)
    s.append(*_rows(0, 3))
    images, cat = _rows(3, 5)
    s.append(images, {**cat, "label": np.array([1, 0], np.int8)})
    label = s.read_catalog(["label"])["label"]
    np.testing.assert_array_equal(label, [-1, -1, -1, 1, 0])


def test_crash_mid_append_leaves_only_committed_rows_visible(tmp_store_url):
    s = _make(tmp_store_url)
    s.append(*_rows(0, 5))
    # A crashed append: every array grown and filled past n_rows, but n_rows never moved.
    ghost_images, ghost = _rows(5, 8)
    ghost["object_id"] = np.array(["ghost5", "ghost6", "ghost7"])
    for arr, values in [(s.images, ghost_images), (s.group["catalog"]["object_id"], ghost["object_id"]),
                        (s.group["catalog"]["id_hash"], id_hash(ghost["object_id"])),
                        (s.group["catalog"]["ra"], ghost["ra"])]:
        arr.resize((8, *arr.shape[1:]))
        arr[5:8] = values
    reopened = SurveyStore.open(tmp_store_url, mode="r+")
    assert reopened.n == 5
    assert len(reopened.read_images()) == 5
    assert list(reopened.object_ids()) == [f"obj{i}" for i in range(5)]
    assert len(reopened.existing_hashes()) == 5
    assert id_hash(["ghost5"])[0] not in reopened.existing_hashes()
    # The next append overwrites the ghost rows and drops the one it does not reach.
    reopened.append(*_rows(5, 7))
    s = SurveyStore.open(tmp_store_url)
    assert s.n == 7 and s.images.shape[0] == 7
    assert list(s.object_ids()) == [f"obj{i}" for i in range(7)]
    np.testing.assert_array_equal(s.read_images()[:, 0, 0, 0], np.arange(7))
    np.testing.assert_array_equal(s.read_catalog(["source"])["source"], [""] * 7)


def test_existing_hashes_are_sorted_ids_of_committed_rows(tmp_store_url):
    s = _make(tmp_store_url)
    s.append(*_rows(0, 6))
    h = s.existing_hashes()
    assert h.dtype == np.uint64 and np.all(np.diff(h.astype(np.float64)) >= 0)
    np.testing.assert_array_equal(h, np.sort(id_hash([f"obj{i}" for i in range(6)])))


def test_quarantine_rows_accumulate(tmp_store_url):
    s = _make(tmp_store_url)
    s.add_quarantine([("a.fits", "a", "all-NaN cutout")])
    s.add_quarantine([("b.fits", "", "not a FITS file"), ("c.fits", "c", "3 bands")])
    q = SurveyStore.open(tmp_store_url).read_quarantine()
    assert list(q["source"]) == ["a.fits", "b.fits", "c.fits"]
    assert list(q["object_id"]) == ["a", "", "c"]
    assert list(q["reason"]) == ["all-NaN cutout", "not a FITS file", "3 bands"]


def test_score_table_done_flags_follow_chunks(tmp_store_url):
    s = _make(tmp_store_url)
    s.append(*_rows(0, 10))
    with pytest.raises(StoreError, match="gsafe score"):
        s.score_table("ae", 1)
    t = s.score_table("ae", 1, statistics=["recon"], create=True)
    t.ensure_rows(s.n)
    assert t.n == 10 and t.pending_chunks() == [0, 1, 2]
    t.write_chunk(1, {"score": np.arange(4.0), "stat_recon": np.ones(4)})
    assert t.pending_chunks() == [0, 2]
    t.write_chunk(0, {"score": np.zeros(4)})
    t.write_chunk(2, {"score": np.zeros(2)})
    assert t.pending_chunks() == []
    # New rows land in the partly filled last chunk: it must be redone, earlier chunks not.
    s.append(*_rows(10, 14))
    reopened = SurveyStore.open(tmp_store_url, mode="r+").score_table("ae", 1)
    reopened.ensure_rows(14)
    assert reopened.pending_chunks() == [2, 3]
    np.testing.assert_array_equal(reopened.read(["score"], 4, 8)["score"], np.arange(4.0))
    assert s.score_tables() == [("ae", "1")]
    with pytest.raises(StoreError, match="expects 2 rows"):
        reopened.write_chunk(3, {"score": np.zeros(3)})
    with pytest.raises(StoreError, match="only 5"):
        reopened.ensure_rows(5)


def test_score_table_on_a_chunk_multiple_adds_only_new_chunks(tmp_store_url):
    s = _make(tmp_store_url)
    s.append(*_rows(0, 8))
    t = s.score_table("ae", "2", statistics=["recon"], create=True)
    t.ensure_rows(8)
    t.write_chunk(0, {"score": np.zeros(4)})
    t.write_chunk(1, {"score": np.zeros(4)})
    with pytest.raises(StoreError, match="8 committed"):
        t.ensure_rows(9)           # a table never grows past the store's committed rows
    s.append(*_rows(8, 9))
    t.ensure_rows(9)
    assert t.pending_chunks() == [2]
    assert t.done_chunks().tolist() == [True, True, False]


def test_a_chunk_that_grew_while_scored_is_not_marked_done(tmp_store_url):
    """A campaign scored chunk 1 as it was (rows 4-5); meanwhile an ingest appended rows 6-9 and another
    campaign grew the table: the first campaign's write must not mark chunk 1 done with rows 6-7 unscored."""
    s = _make(tmp_store_url)
    s.append(*_rows(0, 6))
    t = s.score_table("ae", 1, statistics=["recon"], create=True)
    t.ensure_rows()
    stale = SurveyStore.open(tmp_store_url, mode="r+").score_table("ae", 1)   # the first campaign's view
    SurveyStore.open(tmp_store_url, mode="r+").append(*_rows(6, 10))          # the ingest
    other = SurveyStore.open(tmp_store_url, mode="r+").score_table("ae", 1)
    other.ensure_rows()                                                       # the second campaign
    assert other.n == 10 and other.pending_chunks() == [0, 1, 2]
    assert stale.write_chunk(0, {"score": np.zeros(4)}) is True
    assert stale.write_chunk(1, {"score": np.ones(2)}) is False               # grew: left pending
    fresh = SurveyStore.open(tmp_store_url).score_table("ae", 1)
    assert fresh.pending_chunks() == [1, 2]
    assert other.write_chunk(1, {"score": np.ones(4)}) is True                 # scored whole: done
    assert SurveyStore.open(tmp_store_url).score_table("ae", 1).pending_chunks() == [2]


def test_a_table_never_shrinks_and_grows_only_to_committed_rows(tmp_store_url):
    s = _make(tmp_store_url)
    s.append(*_rows(0, 5))
    stale = SurveyStore.open(tmp_store_url, mode="r+")
    s.append(*_rows(5, 9))
    t = SurveyStore.open(tmp_store_url, mode="r+").score_table("ae", 1, statistics=["recon"], create=True)
    t.ensure_rows()
    assert t.n == 9
    stale.score_table("ae", 1).ensure_rows()     # a campaign that opened the store before the append
    assert SurveyStore.open(tmp_store_url).score_table("ae", 1).n == 9
