"""The survey store: one Zarr v3 group per survey (schema in DESIGN.md).

Layout::

    images            (N, B, H, W) float32, NaN = missing pixel, chunked along N
    catalog/<column>  (N,) arrays aligned with images: object_id (str, unique), id_hash (uint64),
                      ra, dec (float64), source (str), n_missing (int32), and optional columns
                      (label, anomaly_class, ...) created on first use
    aux/<name>        (N, ...) per-object arrays (e.g. the simulator's footprint (N, H, W) uint8)
    quarantine/       source, object_id, reason (str): one row per rejected input
    scores/<model>/<version>/   one table per scoring campaign, see `ScoreTable`

Rows become visible to readers only when ``attrs["n_rows"]`` moves past them, and that is the last
thing `SurveyStore.append` writes: a crash mid-append leaves rows beyond ``n_rows`` that no reader
takes as valid and that the next append overwrites.

Every URL goes through ``zarr.open_group``: plain paths use Zarr's local store, ``file://``,
``s3://``, ``memory://`` and other URLs use fsspec, with the same code.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from infra.errors import SchemaVersionError, StoreError

__all__ = ["SCHEMA_VERSION", "SurveyStore", "ScoreTable", "id_hash", "CORE_COLUMNS"]

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

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = str(url)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, *, bands: tuple[str, ...], height: int, width: int,
               pixel_scale: float = 0.2, chunk_size: int = 1024, provenance: dict | None = None) -> "SurveyStore":
        """A new, empty store at `url`; fails if a store is already there."""
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
        for name in ("source", "object_id", "reason"):
            q.create_array(name, shape=(0,), chunks=(4096,), dtype=str, fill_value="")
        g.create_group("scores")
        g.attrs.update({
            "schema_version": SCHEMA_VERSION, "bands": list(bands), "pixel_scale": float(pixel_scale),
            "height": int(height), "width": int(width), "chunk_size": int(chunk_size), "n_rows": 0,
            "provenance": [provenance] if provenance else [],
        })
        return cls(g, url)

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
        return cls(g, url)

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
    def _column(self, parent: str, name: str, values: np.ndarray) -> zarr.Array:
        grp = self.group[parent]
        if name in grp:
            return grp[name]
        dt, fill = CORE_COLUMNS.get(name, _dtype_and_fill(values))
        cs = self.chunk_size
        arr = grp.create_array(name, shape=(self.n, *values.shape[1:]), chunks=(cs, *values.shape[1:]),
                               dtype=dt, fill_value=fill, compressors=_COMPRESSOR if values.ndim > 1 else "auto")
        return arr

    def append(self, images: np.ndarray, catalog: Mapping[str, np.ndarray],
               aux: Mapping[str, np.ndarray] | None = None) -> tuple[int, int]:
        """Add rows at the end; returns their (start, stop). Readers see them only once all is written.

        `catalog` must hold ``object_id``; other core columns get their defaults when absent, and
        new columns are created (earlier rows get the column's fill value).
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
        start, stop = self.n, self.n + m
        # 1. grow and fill every array beyond the committed rows (invisible to readers)
        targets: list[tuple[zarr.Array, np.ndarray | None]] = [(self.images, images)]
        for name in set(self.columns) | set(cols):
            v = cols.get(name)
            arr = self._column("catalog", name, v) if v is not None else self.group["catalog"][name]
            targets.append((arr, v))
        for name in set(self.aux_names) | set(aux or {}):
            v = None if aux is None else aux.get(name)
            arr = self._column("aux", name, np.asarray(v)) if v is not None else self.group["aux"][name]
            targets.append((arr, None if v is None else np.asarray(v)))
        for arr, v in targets:
            arr.resize((stop, *arr.shape[1:]))
            if v is None:  # a column this append does not carry: fill explicitly, a crashed append may have left junk
                fill = arr.fill_value
                v = np.full((m, *arr.shape[1:]), "" if arr.dtype.kind in "UOT" else fill,
                            dtype=object if arr.dtype.kind in "UOT" else arr.dtype)
            _write_aligned(arr, start, v)
        # 2. commit: the one write that makes the rows real
        self.group.attrs["n_rows"] = stop
        return start, stop

    def set_column(self, name: str, values: np.ndarray, parent: str = "catalog") -> None:
        """Write a whole column over the committed rows (created if new), e.g. labels joined afterwards."""
        values = np.asarray(values)
        if len(values) != self.n:
            raise StoreError(f"store {self.url}: column {name!r} has {len(values)} rows, store {self.n}")
        arr = self._column(parent, name, values)
        if arr.shape[0] != self.n:
            arr.resize((self.n, *arr.shape[1:]))
        _write_aligned(arr, 0, values)

    def add_quarantine(self, rows: list[tuple[str, str, str]]) -> None:
        """Record rejected inputs: (source, object_id or "", reason) each."""
        if not rows:
            return
        q = self.group["quarantine"]
        n0 = q["source"].shape[0]
        for j, name in enumerate(("source", "object_id", "reason")):
            q[name].resize((n0 + len(rows),))
            q[name][n0:] = np.asarray([r[j] for r in rows], dtype=object)

    def read_quarantine(self) -> dict[str, np.ndarray]:
        q = self.group["quarantine"]
        return {k: np.asarray(q[k][:], dtype=object) for k in ("source", "object_id", "reason")}

    def add_provenance(self, record: dict) -> None:
        self.group.attrs["provenance"] = list(self.group.attrs.get("provenance", [])) + [record]

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
    """

    group: zarr.Group
    store: SurveyStore

    @property
    def statistics(self) -> list[str]:
        return list(self.group.attrs["statistics"])

    @property
    def n(self) -> int:
        return int(self.group.attrs["n_rows"])

    def ensure_rows(self, n: int) -> None:
        """Grow the table to the store's `n` rows; a last chunk that gains rows is marked not done."""
        old = self.n
        if n < old:
            raise StoreError(f"scores at {self.group.path}: has {old} rows, store only {n}")
        if n == old and self.group["done"].shape[0] == math.ceil(n / self.store.chunk_size):
            return
        cs = self.store.chunk_size
        for name in self.group.array_keys():
            a = self.group[name]
            a.resize((math.ceil(n / cs),) if name == "done" else (n,))
        if old % cs and n > old:
            self.group["done"][old // cs] = False
        self.group.attrs["n_rows"] = n

    def pending_chunks(self) -> list[int]:
        done = np.asarray(self.group["done"][:], dtype=bool)
        return [int(i) for i in np.nonzero(~done)[0]]

    def done_chunks(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def write_chunk(self, chunk: int, columns: Mapping[str, np.ndarray]) -> None:
        """Write one chunk's rows of every column, then mark it done (whole chunks only: no locks needed)."""
        cs = self.store.chunk_size
        start, stop = chunk * cs, min((chunk + 1) * cs, self.n)
        for name, v in columns.items():
            if name not in self.group:
                raise StoreError(f"scores at {self.group.path}: no column {name!r}")
            v = np.asarray(v, dtype=np.float64)
            if len(v) != stop - start:
                raise StoreError(f"scores at {self.group.path}: chunk {chunk} expects {stop - start} rows, got {len(v)}")
            self.group[name][start:stop] = v
        self.group["done"][chunk] = True

    def read(self, columns: list[str] | None = None, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        stop = self.n if stop is None else min(stop, self.n)
        names = columns or (["score", "p_value", "q_value"] + [f"stat_{s}" for s in self.statistics]
                            + [f"p_{s}" for s in self.statistics])
        return {k: np.asarray(self.group[k][start:stop]) for k in names}

    def write_column(self, name: str, values: np.ndarray) -> None:
        """Write a whole column (e.g. q-values over the survey), chunk by chunk, by one process."""
        arr = self.group[name]
        _write_aligned(arr, 0, np.asarray(values, dtype=np.float64))
