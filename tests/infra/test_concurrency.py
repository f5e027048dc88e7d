"""Writers that share a store: real processes append at the same time, and every row is there once.

The writers are separate Python processes (a small script run with `subprocess`), each opening the
store *before* the other appends: the case that lost rows when each writer appended from the
``n_rows`` it had read at open (zarr's ``resize`` drops the chunks past the new shape).
"""

from __future__ import annotations

import os
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from infra.locks import lock_url_for, store_lock
from infra.store import SurveyStore

BANDS = ("g", "r")
SHAPE = (2, 6, 5)

# argv: store url, writer index, batches, rows per batch, go-file (start together), [storage env]
WRITER = r"""
import os, sys, time
import numpy as np
from infra.store import SurveyStore

url, w, batches, size, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
store = SurveyStore.open(url, mode="r+")   # opened before the other writer appends
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
for b in range(batches):
    code = w * 1_000_000 + b * 1_000 + np.arange(size)
    ids = np.array([f"w{w}-{c}" for c in code])
    images = np.broadcast_to(code.astype(np.float32)[:, None, None, None], (size, 2, 6, 5)).copy()
    store.append(images, {"object_id": ids, "ra": code.astype(np.float64)})
    store.append_table("labels", {"object_id": ids, "label": (code % 2).astype(np.int8), "who": np.array([f"w{w}"] * size)})
    store.add_quarantine([(f"w{w}.fits", f"w{w}-q{b}-{i}", "test reason") for i in range(3)])
"""


def _expected_codes(writers: int, batches: int, size: int) -> np.ndarray:
    return np.sort(np.concatenate([w * 1_000_000 + b * 1_000 + np.arange(size)
                                   for w in range(writers) for b in range(batches)]))


def run_writers(url: str, tmp_path: Path, writers: int = 2, batches: int = 6, size: int = 7,
                env: dict | None = None) -> None:
    """Start `writers` processes on `url`, wait until each has opened the store, let them go together."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(w), str(batches), str(size), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for w in range(writers)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.write_text("go")
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def assert_every_row_once(url: str, writers: int = 2, batches: int = 6, size: int = 7) -> None:
    s = SurveyStore.open(url)
    expected = _expected_codes(writers, batches, size)
    assert s.n == len(expected)
    ids = s.object_ids().astype(str)
    assert "" not in set(ids), "rows with empty ids were committed"
    images = s.read_images()
    assert np.isfinite(images).all(), "rows with NaN images were committed"
    codes = np.array([int(i.split("-")[1]) for i in ids])
    np.testing.assert_array_equal(np.sort(codes), expected)          # every row, exactly once
    np.testing.assert_array_equal(images[:, 1, 5, 4], codes)          # each image with its own id
    np.testing.assert_array_equal(s.read_catalog(["ra"])["ra"], codes)
    labels = s.read_table("labels")
    lab_codes = np.array([int(i.split("-")[1]) for i in labels["object_id"]])
    np.testing.assert_array_equal(np.sort(lab_codes), expected)
    np.testing.assert_array_equal(labels["label"], lab_codes % 2)
    assert Counter(labels["who"]) == {f"w{w}": batches * size for w in range(writers)}
    q = s.read_quarantine()
    assert len(q["object_id"]) == writers * batches * 3 and len(set(q["object_id"])) == writers * batches * 3


def _make(url: str, chunk_size: int = 4) -> SurveyStore:
    return SurveyStore.create(url, bands=BANDS, height=6, width=5, chunk_size=chunk_size)


def _batch(ids: list[str], value: float) -> tuple[np.ndarray, dict]:
    return np.full((len(ids), *SHAPE), value, np.float32), {"object_id": np.array(ids)}


def test_a_writer_opened_earlier_appends_after_the_other_not_over_it(tmp_store_url):
    """The issue's reproduction: A appends 6 rows, B (opened earlier) appends 2: all 8 stay."""
    _make(tmp_store_url)
    a = SurveyStore.open(tmp_store_url, mode="r+")
    b = SurveyStore.open(tmp_store_url, mode="r+")
    assert a.append(*_batch([f"a{i}" for i in range(6)], 1.0)) == (0, 6)
    assert b.append(*_batch(["b0", "b1"], 2.0)) == (6, 8)
    assert a.append(*_batch(["a6"], 3.0)) == (8, 9)       # A's next append: no empty ids, no NaN rows
    s = SurveyStore.open(tmp_store_url)
    assert list(s.object_ids()) == [f"a{i}" for i in range(6)] + ["b0", "b1", "a6"]
    np.testing.assert_array_equal(s.read_images()[:, 0, 0, 0], [1] * 6 + [2, 2, 3])


def test_dedupe_concurrent_drops_ids_another_writer_committed(tmp_store_url):
    _make(tmp_store_url)
    a = SurveyStore.open(tmp_store_url, mode="r+")
    b = SurveyStore.open(tmp_store_url, mode="r+")
    a.append(*_batch(["x", "y"], 1.0))
    assert b.append(*_batch(["y", "z"], 2.0), dedupe_concurrent=True) == (2, 3)
    assert b.append(*_batch(["x"], 2.0), dedupe_concurrent=True) == (3, 3)
    assert list(SurveyStore.open(tmp_store_url).object_ids()) == ["x", "y", "z"]


@pytest.mark.parametrize("kind", ["path", "file", "s3"])
def test_two_writer_processes_keep_every_row_exactly_once(tmp_path, kind, request):
    path = tmp_path / "s.zarr"
    env = None
    if kind == "s3":
        env = os.environ | request.getfixturevalue("s3")
        url = f"s3://gsafe-test/{uuid.uuid4().hex}.zarr"
    else:
        url = str(path) if kind == "path" else path.as_uri()
    _make(url, chunk_size=4)
    run_writers(url, tmp_path, batches=6 if kind != "s3" else 3, env=env)
    assert_every_row_once(url, batches=6 if kind != "s3" else 3)


def test_an_object_store_lease_is_exclusive_and_a_dead_holders_expires(s3):
    from infra.locks import LeaseLost, LockTimeout, _LeaseBackend

    url = f"s3://gsafe-test/{uuid.uuid4().hex}.zarr.lock"
    holder, waiter = _LeaseBackend(url, ttl=1.5, poll=0.1), _LeaseBackend(url, ttl=1.5, poll=0.1)
    holder.acquire(timeout=5)
    with pytest.raises(LockTimeout, match="held by"):
        waiter.acquire(timeout=3)          # twice the ttl: the holder's renewals keep it alive
    holder._stop.set()                     # the holder dies: no more renewals, no release
    holder._renewer.join()
    waiter.acquire(timeout=10)             # taken over once expired
    holder._stop.clear()                   # the holder wakes up: its next renewal finds the lease gone ...
    holder._renew_once = threading.Thread(target=holder._renew, daemon=True)
    holder._renew_once.start()
    holder._renew_once.join(timeout=5)
    with pytest.raises(LeaseLost, match="taken over"):
        holder.check()                     # ... and it commits nothing
    holder._stop.set()
    waiter.release()
    holder._lost = None
    holder.acquire(timeout=5)              # released: free at once
    holder.release()


def test_tables_commit_atomically_and_keep_columns_aligned(tmp_store_url):
    s = _make(tmp_store_url)
    assert s.read_table("labels") == {}
    assert s.append_table("labels", {"object_id": np.array(["a"]), "label": np.array([1], np.int8)}) == (0, 1)
    # a later append with a new column and without an old one: fills on both sides
    assert s.append_table("labels", {"object_id": np.array(["b"]), "tag": np.array(["lens"]),
                                     "score": np.array([0.5])}) == (1, 2)
    t = SurveyStore.open(tmp_store_url).read_table("labels")
    assert list(t["object_id"]) == ["a", "b"]
    assert t["label"].tolist() == [1, -1] and t["tag"].tolist() == ["", "lens"]
    assert np.isnan(t["score"][0]) and t["score"][1] == 0.5
    # rows written past n_rows by a crashed append are invisible, then overwritten
    grp = s.group["labels"]
    for k in grp.array_keys():
        grp[k].resize((5,))
    assert len(SurveyStore.open(tmp_store_url).read_table("labels")["object_id"]) == 2
    s.append_table("labels", {"object_id": np.array(["c"])})
    t = SurveyStore.open(tmp_store_url).read_table("labels")
    assert list(t["object_id"]) == ["a", "b", "c"] and t["label"].tolist() == [1, -1, -1]
    with pytest.raises(Exception, match="cannot be a table"):
        s.append_table("images", {"x": np.zeros(1)})
    with pytest.raises(Exception, match="different lengths"):
        s.append_table("labels", {"object_id": np.array(["d"]), "label": np.array([1, 2])})


def test_a_quarantine_of_a_store_made_before_tables_reads_as_before(tmp_store_url):
    s = _make(tmp_store_url)
    q = s.group["quarantine"]
    del q.attrs["n_rows"]          # stores written before tables had no n_rows on the quarantine
    for k in ("source", "object_id", "reason"):
        q[k].resize((1,))
        q[k][0] = k
    assert {k: list(v) for k, v in SurveyStore.open(tmp_store_url).read_quarantine().items()} == \
        {"source": ["source"], "object_id": ["object_id"], "reason": ["reason"]}
    s.add_quarantine([("a.fits", "a", "bad")])
    assert list(SurveyStore.open(tmp_store_url).read_quarantine()["source"]) == ["source", "a.fits"]


def test_lock_is_exclusive_across_threads_and_reentrant_in_one(tmp_store_url):
    _make(tmp_store_url)
    inside, overlaps = [], []

    def work(k):
        with store_lock(tmp_store_url):
            with store_lock(tmp_store_url):     # re-entrant
                inside.append(k)
                if len(inside) > 1:
                    overlaps.append(k)
                time.sleep(0.02)
                inside.remove(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert lock_url_for(tmp_store_url) == str(Path(tmp_store_url).resolve()) + ".lock"


def test_two_processes_creating_one_store_make_it_once(tmp_path):
    url = str(tmp_path / "new.zarr")
    script = ("import sys; from infra.store import SurveyStore; "
              "s = SurveyStore.create(sys.argv[1], bands=('g','r'), height=6, width=5, chunk_size=4, exist_ok=True); "
              "import numpy as np; s.append(np.ones((3, 2, 6, 5), np.float32), {'object_id': np.array([sys.argv[2] + str(i) for i in range(3)])})")
    procs = [subprocess.Popen([sys.executable, "-c", script, url, tag], stderr=subprocess.PIPE, text=True)
             for tag in ("p", "q")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert sorted(SurveyStore.open(url).object_ids()) == ["p0", "p1", "p2", "q0", "q1", "q2"]


INGEST = r"""
import json, sys, time
from pathlib import Path
from infra.ingest import ingest
from infra.settings import Settings
source, url, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
s = ingest(source, url, settings=Settings(bands=("g", "r"), cutout_size=8, chunk_size=4, progress=False), progress=False)
print(json.dumps({"ingested": s.ingested, "skipped": s.skipped, "quarantined": s.quarantined}), flush=True)
"""


def test_two_ingests_of_overlapping_sources_race_to_create_a_store_and_store_each_id_once(tmp_path):
    """Two ingest processes started together on a store that does not exist yet: both succeed (one
    creates it, the other appends), every id is stored once with its own pixels, and the ids both
    sources hold count as skipped by whichever ingest committed them second."""
    # 200 ids in both, met at once: a from its middle on, b from its start (appends of 4 interleave)
    ids = {"a": np.arange(0, 400), "b": np.arange(200, 600)}
    for name, k in ids.items():
        images = np.broadcast_to(k.astype(np.float32)[:, None, None, None], (k.size, 2, 8, 8)).copy()
        np.savez(tmp_path / f"{name}.npz", images=images, ids=np.array([f"obj{i}" for i in k]))
    url, go = str(tmp_path / "race.zarr"), tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", INGEST, str(tmp_path / f"{name}.npz"), url, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ids]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.write_text("go")
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    s = SurveyStore.open(url)
    stored = s.object_ids().astype(str)
    assert sorted(stored) == sorted(f"obj{i}" for i in range(600))            # each id once
    np.testing.assert_array_equal(s.read_images()[:, 0, 0, 0], [float(o[3:]) for o in stored])
    assert sum(x["ingested"] for x in summaries) == 600 and sum(x["skipped"] for x in summaries) == 200
    assert all(x["quarantined"] == 0 for x in summaries), summaries
