"""Streaming batches from a survey store: training never holds the survey in memory.

Example:
    >>> split = split_rows(np.arange(10, dtype=np.uint64) * 2654435761)   # doctest: +SKIP
    >>> batches = StoreBatches("survey.zarr", split["train"], batch_size=128, shuffle=True)  # doctest: +SKIP
    >>> for x in batches(): ...   # (b, B, H, W) float32, one chunk in memory at a time  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from infra.store import SurveyStore

__all__ = ["split_rows", "StoreBatches"]


def split_rows(id_hashes: np.ndarray, calib_frac: float = 0.15, val_frac: float = 0.1) -> dict[str, np.ndarray]:
    """Deterministic train / val / calib split of a store's rows from their object-id hashes.

    The split depends only on each object's id, so it is the same on every run, on every machine,
    and an object keeps its split when the store grows.
    """
    u = (np.asarray(id_hashes, dtype=np.uint64) % np.uint64(1_000_003)).astype(np.float64) / 1_000_003
    rows = np.arange(len(u))
    calib = u < calib_frac
    val = (u >= calib_frac) & (u < calib_frac + val_frac)
    return {"train": rows[~calib & ~val], "val": rows[val], "calib": rows[calib]}


class StoreBatches:
    """A re-iterable source of (b, B, H, W) float32 batches of the given rows of a store.

    Each call returns a fresh iterator; with `shuffle` the chunk order and the rows within each
    chunk are permuted anew every epoch (seeded). Memory: one store chunk plus one batch. With
    `variance` and a store that holds pixel variances (``aux/variance``), each batch is a pair
    `(cutouts, variances)`, as :class:`~gsafe_models.detector.Detector` takes them.
    """

    def __init__(self, store_url: str, rows: np.ndarray, batch_size: int = 128, shuffle: bool = False,
                 seed: int = 0, limit: int | None = None, variance: bool = False):
        self.store_url = store_url
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        if limit is not None and len(self.rows) > limit:
            self.rows = np.sort(np.random.default_rng(seed).choice(self.rows, limit, replace=False))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.variance = variance
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
        store = SurveyStore.open(self.store_url)
        pairs = self.variance and "variance" in store.aux_names
        B = len(store.bands)
        cs = store.chunk_size
        rng = np.random.default_rng([self.seed, self._epoch])
        self._epoch += 1
        chunks = np.unique(self.rows // cs)
        if self.shuffle:
            chunks = rng.permutation(chunks)
        buf: list[np.ndarray] = []
        held = 0
        for c in chunks:
            sel = self.rows[self.rows // cs == c] - c * cs
            block = store.read_images(int(c) * cs, int(c + 1) * cs)[sel]
            if pairs:  # variances ride along as extra channels, so every permutation keeps them aligned
                block = np.concatenate([block, store.read_variance(int(c) * cs, int(c + 1) * cs)[sel]], axis=1)
            if self.shuffle:
                block = block[rng.permutation(len(block))]
            buf.append(block)
            held += len(block)
            while held >= self.batch_size:
                cat = np.concatenate(buf)
                yield self._out(cat[: self.batch_size], B, pairs)
                rest = cat[self.batch_size:]
                buf, held = ([rest] if len(rest) else []), len(rest)
        if held:
            yield self._out(np.concatenate(buf), B, pairs)

    @staticmethod
    def _out(batch: np.ndarray, bands: int, pairs: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return (batch[:, :bands], batch[:, bands:]) if pairs else batch
