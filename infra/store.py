"""The survey store: one Zarr v3 group per survey.

Layout::

    images            (N, B, H, W) float32, NaN = missing pixel, chunked along N
    catalog/<column>  (N,) arrays aligned with images: object_id (str, unique), id_hash (uint64),
                      ra, dec (float64), source (str), n_missing (int32), and optional columns
                      (label, anomaly_class, ...) created on first use
    aux/<name>        (N, ...) per-object arrays (e.g. the simulator's footprint (N, H, W) uint8)
    quarantine/       source, object_id, reason (str): one row per rejected input (an append-only table)
    <table>/          other append-only tables (e.g. ``labels``): 1-D columns, see `SurveyStore.append_table`
    scores/<model>/<version>/   one table per scoring campaign, see `ScoreTable`

Rows become visible to readers only when ``attrs["n_rows"]`` moves past them, and that is the last
thing `SurveyStore.append` writes: a crash mid-append leaves rows beyond ``n_rows`` that no reader
takes as valid and that the next append overwrites. Tables commit the same way, with ``n_rows`` in
their own group's attributes.

One writer at a time: every append, table append, column write and score-table growth holds the
store's lock (`SurveyStore.lock`, see `infra.locks`) and re-reads ``n_rows`` under it, so a second
process appending at the same time queues behind the first instead of resizing over its rows
(zarr's ``resize`` deletes every chunk past the new shape).

Every URL goes through ``zarr.open_group``: plain paths use Zarr's local store, ``file://``,
``s3://``, ``memory://`` and other URLs use fsspec, with the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from infra.errors import SchemaVersionError, StoreError
from infra.locks import DEFAULT_TIMEOUT, store_lock

__all__ = ["SCHEMA_VERSION", "SurveyStore", "ScoreTable", "id_hash", "CORE_COLUMNS"]

log = logging.getLogger("gsafe.store")

SCHEMA_VERSION = 1
_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")

# column -> (dtype, fill value); dtype str means Zarr's variable-length UTF-8 strings
CORE_COLUMNS: dict[str, tuple[object, object]] = {
    "object_id": (str, ""),
    "id_hash": ("uint64", 0),
    "ra": ("float64", float("nan")),
    "dec": ("float64", float("nan")),
    "source": (str, ""),
    "n_missing": ("int32", 0),
}


def id_hash(object_ids) -> np.ndarray:
    """64-bit hashes of object ids, (N,) uint64: a compact index for duplicate checks."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(o).encode(), digest_size=8).digest(), "little") for o in object_ids),
        dtype=np.uint64, count=len(object_ids))


def _dtype_and_fill(values: np.ndarray) -> tuple[object, object]:
    if values.dtype.kind in "USOT":
        return str, ""
    if values.dtype.kind == "f":
        return values.dtype.str, float("nan")
    if values.dtype.kind == "b":
        return "bool", False
    return values.dtype.str, -1 if values.dtype.kind == "i" else 0


#: Groups of the store that are not append-only tables.
_NOT_TABLES = ("images", "catalog", "aux", "scores")
_TABLE_CHUNK = 4096
_QUARANTINE_COLUMNS = ("source", "object_id", "reason")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _url_options(url: str) -> dict:
    """Extra `zarr.open_group` arguments for `url`: fsspec's local filesystem (``file://``) makes no
    parent folders unless told, so creating a store or writing a new chunk there would fail."""
    return {"storage_options": {"auto_mkdir": True}} if str(url).startswith("file://") else {}


def _open_group(url: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(store=str(url), mode=mode, zarr_format=3, **_url_options(url))
    except FileNotFoundError as e:
        raise StoreError(f"store {url}: not found ({e}); create it with `gsafe ingest` or `gsafe simulate --store`") from e
    except zarr.errors.ContainsArrayError as e:
        raise StoreError(f"store {url}: not a gsafe survey store (it holds a single Zarr array)") from e


def _table_values(v) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.kind in "USOT":
        return np.asarray([str(x) for x in v.ravel()], dtype=object).reshape(v.shape)
    if v.dtype.kind not in "biuf":
        raise StoreError(f"table column of dtype {v.dtype}: expected strings, numbers or booleans")
    return v


def _table_rows(grp: zarr.Group) -> int:
    """Committed rows of a table group: its ``n_rows`` (stores before tables had it: the shortest column)."""
    n = grp.attrs.get("n_rows")
    if n is not None:
        return int(n)
    lengths = [grp[k].shape[0] for k in grp.array_keys()]
    return min(lengths) if lengths else 0


def _write_aligned(arr: zarr.Array, start: int, values: np.ndarray) -> None:
    """Write rows [start, start+len(values)) in pieces that never straddle a chunk boundary."""
    cs = arr.chunks[0]
    pos, stop = start, start + len(values)
    while pos < stop:
        end = min(stop, (pos // cs + 1) * cs)
        arr[pos:end] = values[pos - start:end - start]
        pos = end


class SurveyStore:
    """A survey store opened for reading or appending.

    Arguments:
        group: the open Zarr group.
        url: where it lives, for messages.

    Example:
        >>> s = SurveyStore.create("memory://doc", bands=("g", "r"), height=8, width=8, chunk_size=4)
        >>> s.append(np.zeros((3, 2, 8, 8), np.float32), {"object_id": np.array(["a", "b", "c"])})
        >>> s.n, list(s.read_catalog(["object_id"])["object_id"])
        (3, ['a', 'b', 'c'])
    """

    def __init__(self, group: zarr.Group, url: str, mode: str = "r"):
        self.group = group
        self.url = str(url)
        self.mode = mode
        self._seen_n = int(group.attrs.get("n_rows", 0))  # rows this object has accounted for (see append)
        self._theirs = np.empty(0, np.uint64)  # id hashes other writers committed since (dedupe_concurrent)

    def refresh(self) -> "SurveyStore":
        """Re-read the store's attributes (``n_rows``...): another process may have appended since."""
        self.group = _open_group(self.url, "r+" if self.mode != "r" else "r")
        return self

    @contextlib.contextmanager
    def lock(self, timeout: float = DEFAULT_TIMEOUT):
        """Hold the store's writer lock (one writer at a time, across processes and machines).

        Re-entrant in one thread; the store's attributes are re-read on entry, so ``self.n`` is the
        committed row count for as long as the lock is held. See `infra.locks` for how it works on
        local paths and on object stores.

        Example:
            >>> s = SurveyStore.create("memory://doc-lock-store", bands=("g",), height=4, width=4)
            >>> with s.lock():
            ...     s.append(np.zeros((2, 1, 4, 4), np.float32), {"object_id": np.array(["a", "b"])})
            (0, 2)
        """
        with store_lock(self.url, timeout) as guard:
            self.refresh()
            yield guard

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, *, bands: tuple[str, ...], height: int, width: int,
               pixel_scale: float = 0.2, chunk_size: int = 1024, provenance: dict | None = None,
               exist_ok: bool = False) -> "SurveyStore":
        """A new, empty store at `url`; fails if a store is already there, unless `exist_ok`, which
        opens that store instead (for appending) when another process created it first.

        Holds the store's lock, so two processes creating one store at once make it once.
        """
        with store_lock(str(url)):
            if exist_ok and cls.exists(url):
                return cls.open(url, mode="r+")
            return cls._create(url, bands=bands, height=height, width=width, pixel_scale=pixel_scale,
                               chunk_size=chunk_size, provenance=provenance)

    @classmethod
    def _create(cls, url: str, *, bands: tuple[str, ...], height: int, width: int, pixel_scale: float,
                chunk_size: int, provenance: dict | None) -> "SurveyStore":
        try:
            g = zarr.open_group(store=str(url), mode="w-", zarr_format=3, **_url_options(url))
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as e:
            raise StoreError(f"store {url}: already exists; open it instead, or pick another path") from e
        nb = len(bands)
        g.create_array("images", shape=(0, nb, height, width), chunks=(chunk_size, nb, height, width),
                       dtype="float32", fill_value=float("nan"), compressors=_COMPRESSOR)
        cat = g.create_group("catalog")
        for name, (dt, fill) in CORE_COLUMNS.items():
            cat.create_array(name, shape=(0,), chunks=(chunk_size,), dtype=dt, fill_value=fill)
        g.create_group("aux")
        q = g.create_group("quarantine")
        for name in _QUARANTINE_COLUMNS:
            q.create_array(name, shape=(0,), chunks=(_TABLE_CHUNK,), dtype=str, fill_value="")
        q.attrs["n_rows"] = 0
        g.create_group("scores")
        g.attrs.update({
            "schema_version": SCHEMA_VERSION, "bands": list(bands), "pixel_scale": float(pixel_scale),
            "height": int(height), "width": int(width), "chunk_size": int(chunk_size), "n_rows": 0,
            "provenance": [provenance] if provenance else [],
        })
        return cls(g, url, mode="r+")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "SurveyStore":
        """Open an existing store; `mode` "r" to read, "r+" to append or write scores."""
        g = _open_group(url, mode)
        version = g.attrs.get("schema_version")
        if version is None or "images" not in g:
            raise StoreError(f"store {url}: not a gsafe survey store (no schema_version / images)")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"store {url}: schema version {version}, this gsafe reads version {SCHEMA_VERSION}; "
                f"re-ingest the sources with this version of gsafe")
        return cls(g, url, mode)

    @classmethod
    def exists(cls, url: str) -> bool:
        try:
            cls.open(url)
            return True
        except StoreError:
            return False

    # ---- metadata ------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Committed rows: the only rows a reader may use."""
        return int(self.group.attrs["n_rows"])

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.group.attrs["bands"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(B, H, W) of one cutout."""
        a = self.group.attrs
        return (len(a["bands"]), int(a["height"]), int(a["width"]))

    @property
    def chunk_size(self) -> int:
        return int(self.group.attrs["chunk_size"])

    @property
    def pixel_scale(self) -> float:
        return float(self.group.attrs["pixel_scale"])

    @property
    def attrs(self) -> Mapping:
        return self.group.attrs

    @property
    def images(self) -> zarr.Array:
        return self.group["images"]

    @property
    def columns(self) -> list[str]:
        return sorted(self.group["catalog"].array_keys())

    @property
    def aux_names(self) -> list[str]:
        return sorted(self.group["aux"].array_keys())

    def chunk_bounds(self, n: int | None = None) -> list[tuple[int, int]]:
        """[(start, stop)] of every store chunk over the first `n` (default: all committed) rows."""
        n = self.n if n is None else n
        cs = self.chunk_size
        return [(s, min(s + cs, n)) for s in range(0, n, cs)]

    # ---- reading -------------------------------------------------------------------------
    def _check(self, start: int, stop: int | None) -> tuple[int, int]:
        n = self.n
        stop = n if stop is None else min(stop, n)
        if start < 0 or start > stop:
            raise StoreError(f"store {self.url}: rows [{start}, {stop}) out of range (N={n})")
        return start, stop

    def read_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Cutouts [start, stop), (n, B, H, W) float32 with NaN for missing pixels."""
        start, stop = self._check(start, stop)
        return np.asarray(self.images[start:stop], dtype=np.float32)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Cutouts at arbitrary committed row indices, (len(rows), B, H, W); reads each chunk once."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise StoreError(f"store {self.url}: row index out of range (N={self.n})")
        out = np.empty((len(rows), *self.image_shape), np.float32)
        cs = self.chunk_size
        for c in np.unique(rows // cs):
            sel = np.nonzero(rows // cs == c)[0]
            block = self.read_images(int(c) * cs, int(c + 1) * cs)
            out[sel] = block[rows[sel] - int(c) * cs]
        return out

    def read_catalog(self, columns: list[str] | None = None, start: int = 0,
                     stop: int | None = None) -> dict[str, np.ndarray]:
        """Catalog columns over rows [start, stop) as numpy arrays (strings as str objects)."""
        start, stop = self._check(start, stop)
        cat = self.group["catalog"]
        names = columns or self.columns
        out = {}
        for name in names:
            if name not in cat:
                raise StoreError(f"store {self.url}: no catalog column {name!r} (has {', '.join(self.columns)})")
            v = cat[name][start:stop]
            out[name] = np.asarray(v, dtype=object) if cat[name].dtype.kind in "UOT" else np.asarray(v)
        return out

    def read_aux(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        start, stop = self._check(start, stop)
        if name not in self.group["aux"]:
            raise StoreError(f"store {self.url}: no aux array {name!r}")
        return np.asarray(self.group["aux"][name][start:stop])

    def read_variance(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Pixel variances [start, stop), (n, B, H, W) float32 in image units squared, NaN where
        unknown; None when the store holds none (``aux/variance``, written by ingest from a
        survey's variance or inverse-variance planes)."""
        if "variance" not in self.group["aux"]:
            return None
        return self.read_aux("variance", start, stop).astype(np.float32, copy=False)

    def object_ids(self) -> np.ndarray:
        return self.read_catalog(["object_id"])["object_id"]

    def iter_chunks(self, columns: list[str] | None = None) -> Iterator[tuple[int, int, np.ndarray, dict]]:
        """(start, stop, images, catalog) for every chunk, one at a time: memory is one chunk."""
        for s, e in self.chunk_bounds():
            yield s, e, self.read_images(s, e), self.read_catalog(columns or ["object_id"], s, e)

    def existing_hashes(self) -> np.ndarray:
        """Sorted id hashes of all committed rows, (N,) uint64: 8 bytes per object."""
        return np.sort(np.asarray(self.group["catalog"]["id_hash"][: self.n], dtype=np.uint64))

    # ---- writing -------------------------------------------------------------------------
    def _column(self, parent: str, name: str, values: np.ndarray, grp: zarr.Group | None = None) -> zarr.Array:
        grp = self.group[parent] if grp is None else grp
        if name in grp:
            return grp[name]
        return self._new_column(grp, name, values)

    def _new_column(self, grp: zarr.Group, name: str, values: np.ndarray) -> zarr.Array:
        dt, fill = CORE_COLUMNS.get(name, _dtype_and_fill(values))
        cs = self.chunk_size
        arr = grp.create_array(name, shape=(self.n, *values.shape[1:]), chunks=(cs, *values.shape[1:]),
                               dtype=dt, fill_value=fill, compressors=_COMPRESSOR if values.ndim > 1 else "auto")
        return arr

    def append(self, images: np.ndarray, catalog: Mapping[str, np.ndarray],
               aux: Mapping[str, np.ndarray] | None = None, *, dedupe_concurrent: bool = False) -> tuple[int, int]:
        """Add rows at the end; returns their (start, stop). Readers see them only once all is written.

        `catalog` must hold ``object_id``; other core columns get their defaults when absent, and
        new columns are created (earlier rows get the column's fill value).

        Safe against other writers: the store's lock is held and ``n_rows`` re-read under it, so
        rows go after whatever another process committed meanwhile, and never over it.

        Arguments:
            images: (m, B, H, W) float32, counts, NaN = missing.
            catalog: {column: (m,) array}, with ``object_id``.
            aux: {name: (m, ...) array} per-object arrays.
            dedupe_concurrent: drop rows whose object id another writer committed since this
                store object was opened: an ingest that checked ids at its start stays
                duplicate-free while another ingest runs. Then ``stop - start`` may be less than m.
        """
        images = np.asarray(images, dtype=np.float32)
        m = len(images)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise StoreError(f"store {self.url}: append of shape {images.shape}, store holds (N, {self.image_shape})")
        if "object_id" not in catalog:
            raise StoreError(f"store {self.url}: append without catalog['object_id']")
        cols = {k: np.asarray(v) for k, v in catalog.items()}
        cols["object_id"] = np.asarray([str(o) for o in cols["object_id"]], dtype=object)
        cols["id_hash"] = id_hash(cols["object_id"])
        for k, v in list(cols.items()) + list((aux or {}).items()):
            if len(v) != m:
                raise StoreError(f"store {self.url}: column {k!r} has {len(v)} rows, images {m}")
        if m == 0:
            return self.n, self.n
        with self.lock() as guard:
            if self.n > self._seen_n:   # another writer's rows: remember their ids (8 bytes each)
                new = np.asarray(self.group["catalog"]["id_hash"][self._seen_n:self.n], dtype=np.uint64)
                self._theirs = np.union1d(self._theirs, new)
                self._seen_n = self.n
            if dedupe_concurrent and len(self._theirs):
                keep = ~np.isin(cols["id_hash"], self._theirs)
                if not keep.all():
                    images = images[keep]
                    cols = {k: v[keep] for k, v in cols.items()}
                    aux = {k: np.asarray(v)[keep] for k, v in (aux or {}).items()}
                    m = len(images)
            if m == 0:
                self._seen_n = self.n
                return self.n, self.n
            start, stop = self._append_locked(images, cols, aux, guard)
            self._seen_n = stop
            return start, stop

    def _append_locked(self, images: np.ndarray, cols: dict[str, np.ndarray],
                       aux: Mapping[str, np.ndarray] | None, guard) -> tuple[int, int]:
        m = len(images)
        start, stop = self.n, self.n + m
        # 1. grow and fill every array beyond the committed rows (invisible to readers); each
        # group's arrays are listed once (on an object store every metadata read is a request)
        targets: list[tuple[zarr.Array, np.ndarray | None]] = [(self.images, images)]
        for parent, values in (("catalog", cols), ("aux", {k: np.asarray(v) for k, v in (aux or {}).items()})):
            grp = self.group[parent]
            arrays = dict(grp.arrays())
            for name in set(arrays) | set(values):
                v = values.get(name)
                arr = arrays[name] if name in arrays else self._new_column(grp, name, v)
                targets.append((arr, v))
        for arr, v in targets:
            arr.resize((stop, *arr.shape[1:]))
            if v is None:  # a column this append does not carry: fill explicitly, a crashed append may have left junk
                fill = arr.fill_value
                v = np.full((m, *arr.shape[1:]), "" if arr.dtype.kind in "UOT" else fill,
                            dtype=object if arr.dtype.kind in "UOT" else arr.dtype)
            _write_aligned(arr, start, v)
        # 2. commit: the one write that makes the rows real
        guard.check()
        self.group.attrs["n_rows"] = stop
        return start, stop

    def set_column(self, name: str, values: np.ndarray, parent: str = "catalog") -> None:
        """Write a whole column over the committed rows (created if new), e.g. labels joined afterwards.

        Call it with the store's lock held and the values computed under it (as `attach_truth`
        does): ``len(values)`` must equal the committed rows, which another writer may change.
        """
        values = np.asarray(values)
        with self.lock():
            if len(values) != self.n:
                raise StoreError(f"store {self.url}: column {name!r} has {len(values)} rows, store {self.n} "
                                 f"(another writer may have appended meanwhile: compute it under `store.lock()`)")
            arr = self._column(parent, name, values)
            if arr.shape[0] != self.n:
                arr.resize((self.n, *arr.shape[1:]))
            _write_aligned(arr, 0, values)

    # ---- append-only tables ----------------------------------------------------------------
    def append_table(self, name: str, columns: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Append rows to the small append-only table `name` (labels, quarantine...); returns (start, stop).

        The table is a group of 1-D columns created on first use: strings as Zarr strings, numbers
        and booleans as their dtype. A column absent from this append gets its fill value ("" for
        strings, NaN for floats, -1 for signed and 0 for unsigned integers, False); a new column
        gets that fill for earlier rows. Rows are committed atomically for readers (the table's
        ``n_rows`` moves last) under the store's lock, so concurrent writers never lose a row.

        Arguments:
            name: the table, e.g. ``"labels"``; not one of the store's own groups.
            columns: {column: (m,) array}, all of one length m.

        Example:
            >>> s = SurveyStore.create("memory://doc-table", bands=("g",), height=4, width=4)
            >>> s.append_table("labels", {"object_id": np.array(["a", "b"]), "label": np.array([1, 0])})
            (0, 2)
            >>> {k: v.tolist() for k, v in s.read_table("labels").items()}
            {'label': [1, 0], 'object_id': ['a', 'b']}
        """
        if name in _NOT_TABLES or not _NAME.match(name):
            raise StoreError(f"store {self.url}: {name!r} cannot be a table name (letters, digits, _ . -; "
                             f"not one of {', '.join(_NOT_TABLES)})")
        cols = {str(k): _table_values(v) for k, v in columns.items()}
        bad = [k for k, v in cols.items() if v.ndim != 1 or not _NAME.match(k)]
        if bad:
            raise StoreError(f"store {self.url}: table {name}: columns {bad} must be 1-D with plain names")
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise StoreError(f"store {self.url}: table {name}: columns of different lengths "
                             f"{ {k: len(v) for k, v in cols.items()} }")
        m = lengths.pop() if lengths else 0
        with self.lock() as guard:
            grp = self.group.require_group(name)
            n0 = _table_rows(grp)
            if m == 0:
                return n0, n0
            arrays = {k: grp[k] for k in grp.array_keys()}
            for k, v in cols.items():
                if k not in arrays:
                    dt, fill = _dtype_and_fill(v)
                    arrays[k] = grp.create_array(k, shape=(n0,), chunks=(_TABLE_CHUNK,), dtype=dt, fill_value=fill)
            for k, arr in arrays.items():
                arr.resize((n0 + m,))
                v = cols.get(k)
                if v is None:   # junk of a crashed append may lie there: write the fill explicitly
                    v = np.full(m, "" if arr.dtype.kind in "UOT" else arr.fill_value,
                                dtype=object if arr.dtype.kind in "UOT" else arr.dtype)
                arr[n0:n0 + m] = v
            guard.check()
            grp.attrs["n_rows"] = n0 + m
            return n0, n0 + m

    def read_table(self, name: str) -> dict[str, np.ndarray]:
        """The committed rows of table `name`, {column: (n,) array} (strings as str objects); {} if absent."""
        if name in _NOT_TABLES or name not in self.group:
            return {}
        grp = self.group[name]   # read afresh: the table's n_rows, not the one seen at open
        if not isinstance(grp, zarr.Group):
            return {}
        n = _table_rows(grp)
        out = {}
        for k in sorted(grp.array_keys()):
            a = grp[k]
            v = a[:n]
            out[k] = np.asarray(v, dtype=object) if a.dtype.kind in "UOT" else np.asarray(v)
        return out

    def tables(self) -> list[str]:
        """Names of the append-only tables in the store (quarantine, labels...)."""
        return sorted(k for k in self.group.group_keys() if k not in _NOT_TABLES)

    def add_quarantine(self, rows: list[tuple[str, str, str]]) -> None:
        """Record rejected inputs, (source, object_id or "", reason) each, as one atomic table append."""
        if not rows:
            return
        self.append_table("quarantine", {name: np.asarray([str(r[j]) for r in rows], dtype=object)
                                         for j, name in enumerate(_QUARANTINE_COLUMNS)})

    def read_quarantine(self) -> dict[str, np.ndarray]:
        """The quarantine table: source, object_id, reason, (n,) str objects each."""
        t = self.read_table("quarantine")
        return {k: t.get(k, np.empty(0, dtype=object)) for k in _QUARANTINE_COLUMNS}

    def add_provenance(self, record: dict) -> None:
        with self.lock():
            self.group.attrs["provenance"] = list(self.group.attrs.get("provenance", [])) + [record]

    # ---- what hunts have reported -----------------------------------------------------------
    def reported_rows(self, model: str) -> int | None:
        """Rows [0, r) whose candidates a hunt with `model` has listed, or None if no hunt has.

        Written only after a hunt has written its candidate list, so a hunt that crashes after
        scoring leaves its new objects "new" for the next one.
        """
        path = f"scores/{model}"
        if path not in self.group:
            return None
        r = self.group[path].attrs.get("reported_rows")
        return None if r is None else int(r)

    def set_reported_rows(self, model: str, rows: int) -> None:
        """Move the `model`'s reported marker forward to `rows` (never back)."""
        with self.lock():
            g = self.group.require_group(f"scores/{model}")
            old = g.attrs.get("reported_rows")
            g.attrs["reported_rows"] = int(rows) if old is None else max(int(old), int(rows))

    # ---- score tables --------------------------------------------------------------------
    def score_table(self, model: str, version: str | int, statistics: list[str] | None = None,
                    create: bool = False) -> "ScoreTable":
        """The table of campaign `model`/`version`; `create` makes it (with `statistics` columns)."""
        path = f"scores/{model}/{version}"
        if path in self.group:
            return ScoreTable(self.group[path], self)
        if not create:
            raise StoreError(f"store {self.url}: no scores for {model} version {version}; run `gsafe score` first")
        if not statistics:
            raise StoreError("score_table: statistics are needed to create a table")
        with self.lock():   # two campaigns starting at once make the table once
            if path in self.group:
                return ScoreTable(self.group[path], self)
            g = self.group.require_group(path)
            cs = self.chunk_size
            for name in ["score", "p_value", "q_value"] + [f"stat_{s}" for s in statistics] + [f"p_{s}" for s in statistics]:
                g.create_array(name, shape=(0,), chunks=(cs,), dtype="float64", fill_value=float("nan"))
            g.create_array("done", shape=(0,), chunks=(1,), dtype="bool", fill_value=False)
            g.attrs.update({"statistics": list(statistics), "n_rows": 0, "chunk_size": cs, "q_rows": 0})
            return ScoreTable(g, self)

    def score_tables(self) -> list[tuple[str, str]]:
        out = []
        for model in self.group["scores"].group_keys():
            for version in self.group["scores"][model].group_keys():
                out.append((model, version))
        return out


@dataclass
class ScoreTable:
    """The results of one campaign, ``scores/<model>/<version>``: chunk-aligned columns and a `done` flag per chunk.

    A worker writes its chunk's region of every column, then sets ``done[chunk]`` last, so a
    chunk whose flag is set is complete; a restarted campaign redoes only chunks whose flag is not.

    With an ingest running alongside: the table grows only to the store's committed rows
    (`ensure_rows`), and a chunk that gained rows after it was read is written but not marked
    done (`write_chunk` checks under the store's lock), so the next campaign redoes it.
    """

    group: zarr.Group
    store: SurveyStore

    @property
    def statistics(self) -> list[str]:
        return list(self.group.attrs["statistics"])

    @property
    def n(self) -> int:
        return int(self.group.attrs["n_rows"])

    def _reload(self) -> None:
        self.group = self.store.group[self.group.path]

    def ensure_rows(self, n: int | None = None) -> None:
        """Grow the table to `n` rows (default: the store's committed rows, read under its lock);
        a last chunk that gains rows is marked not done. Never shrinks: a table another campaign
        grew further stays as it is."""
        with self.store.lock() as guard:
            self._reload()
            committed = self.store.n
            n = committed if n is None else int(n)
            old = self.n
            if n < old:
                raise StoreError(f"scores at {self.group.path}: has {old} rows, store only {n}")
            if n > committed:
                raise StoreError(f"scores at {self.group.path}: cannot grow to {n} rows, the store has {committed} committed")
            if n == old and self.group["done"].shape[0] == math.ceil(n / self.store.chunk_size):
                return
            cs = self.store.chunk_size
            for name in self.group.array_keys():
                a = self.group[name]
                a.resize((math.ceil(n / cs),) if name == "done" else (n,))
            if old % cs and n > old:
                self.group["done"][old // cs] = False
            guard.check()
            self.group.attrs["n_rows"] = n

    def pending_chunks(self) -> list[int]:
        done = np.asarray(self.group["done"][:], dtype=bool)
        return [int(i) for i in np.nonzero(~done)[0]]

    def done_chunks(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def write_chunk(self, chunk: int, columns: Mapping[str, np.ndarray]) -> bool:
        """Write one chunk's rows of every column, then mark it done; returns whether it was marked.

        The rows are the chunk's rows as this table object saw them (``self.n``). Columns are
        written without the lock (whole chunks: workers never share one); the done flag is set
        under the store's lock and only if the chunk has not gained rows meanwhile (an ingest
        and a campaign growing the table while this chunk was scored): such a chunk stays
        pending and the next campaign scores it whole.
        """
        cs = self.store.chunk_size
        start, stop = chunk * cs, min((chunk + 1) * cs, self.n)
        for name, v in columns.items():
            if name not in self.group:
                raise StoreError(f"scores at {self.group.path}: no column {name!r}")
            v = np.asarray(v, dtype=np.float64)
            if len(v) != stop - start:
                raise StoreError(f"scores at {self.group.path}: chunk {chunk} expects {stop - start} rows, got {len(v)}")
            self.group[name][start:stop] = v
        with self.store.lock() as guard:
            now = int(self.store.group[self.group.path].attrs["n_rows"])
            if min((chunk + 1) * cs, now) != stop:
                log.info("scores at %s: chunk %d grew from %d to %d rows while scored: left pending",
                         self.group.path, chunk, stop - start, min((chunk + 1) * cs, now) - start)
                return False
            guard.check()
            self.group["done"][chunk] = True
            return True

    def read(self, columns: list[str] | None = None, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        stop = self.n if stop is None else min(stop, self.n)
        names = columns or (["score", "p_value", "q_value"] + [f"stat_{s}" for s in self.statistics]
                            + [f"p_{s}" for s in self.statistics])
        return {k: np.asarray(self.group[k][start:stop]) for k in names}

    def write_column(self, name: str, values: np.ndarray) -> None:
        """Write a whole column (e.g. q-values over the survey), chunk by chunk, by one process."""
        arr = self.group[name]
        _write_aligned(arr, 0, np.asarray(values, dtype=np.float64))
