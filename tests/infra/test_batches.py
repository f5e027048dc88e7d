"""StoreBatches: every requested row once per epoch, with its own pixel variances when asked."""

import numpy as np

from infra.batches import StoreBatches, split_rows
from infra.store import SurveyStore


def _store(tmp_path, variance: bool) -> str:
    url = str(tmp_path / "s.zarr")
    s = SurveyStore.create(url, bands=("g", "r"), height=4, width=4, chunk_size=8)
    n = 30
    images = np.arange(n, dtype=np.float32)[:, None, None, None] + np.zeros((n, 2, 4, 4), np.float32)
    aux = {"variance": 2 * images + 1} if variance else None
    s.append(images, {"object_id": np.array([f"o{i}" for i in range(n)])}, aux)
    return url


def test_shuffled_batches_carry_each_rows_own_variances(tmp_path):
    url = _store(tmp_path, variance=True)
    rows = np.arange(3, 27)
    batches = StoreBatches(url, rows, batch_size=5, shuffle=True, seed=1, variance=True)
    for _ in range(2):  # two epochs, two orders
        seen = []
        for images, variance in batches():
            np.testing.assert_array_equal(variance, 2 * images + 1)
            seen += list(images[:, 0, 0, 0].astype(int))
        assert sorted(seen) == list(rows)
    plain = list(StoreBatches(url, rows, batch_size=5)())
    assert all(isinstance(b, np.ndarray) for b in plain)


def test_a_store_without_variances_gives_plain_batches(tmp_path):
    url = _store(tmp_path, variance=False)
    assert SurveyStore.open(url).read_variance() is None
    batches = list(StoreBatches(url, np.arange(30), batch_size=7, variance=True)())
    assert all(isinstance(b, np.ndarray) for b in batches) and sum(map(len, batches)) == 30


def test_split_is_a_partition_and_stable():
    h = np.arange(1000, dtype=np.uint64) * np.uint64(2654435761)
    a, b = split_rows(h), split_rows(h)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(np.concatenate(list(a.values()))) == list(range(1000))
