"""Read cutouts from survey sources and validate them: good cutouts out, bad input as `Rejected`.

Sources, all streamed (never the whole source in memory):

- a directory of FITS cutouts, files in name order. A file is one of
    * a whole object: a (B, H, W) cube in its first image HDU, or one 2-D image HDU per band;
    * one band of one object (HSC style: PRIMARY + IMAGE / MASK / VARIANCE): a single 2-D science
      image and a ``FILTER`` keyword, when the store has more than one band. Such files are joined
      by object id (the ``objid_key`` header keyword; without it, the file name less its FILTER
      value, so ``42-cutout-HSC-G-9813.fits`` is object ``42-cutout-9813``) into one cutout in the
      store's band order; an object left without a band at the end of the directory is one
      rejection ("missing band y: ..."), a second file for a band is rejected alone.
  Plain, gzip/bzip2-compressed (``.fits.gz``) and tile-compressed (fpack ``.fits.fz``, Rice, GZIP,
  HCOMPRESS, PLIO) files are all read.
- a FITS tile (2-D image, or (B, H, W) cube, with a celestial WCS; plain, gzip or tile-compressed)
  and a catalog (CSV or FITS table) with ``ra, dec`` in degrees or ``x, y`` in 0-based pixels.
- ``.npy`` of (N, B, H, W) cutouts, or ``.npz`` with ``images`` and optional ``ids``, ``ra``,
  ``dec``, ``variance`` and ``mask`` (the last two shaped like ``images``).

Extensions are recognised by ``EXTNAME`` (or ``EXTTYPE`` / ``IMAGETYP``): MASK, MSK, DQ, BITMASK,
MASKBITS, FLAGS hold bit masks; VARIANCE, VAR variances; INVVAR, IVAR, WEIGHT, WHT inverse variances
(a weight map is taken as inverse variance); PSF is ignored; every other image HDU is science. A
tile's weight map may also be a SWarp-style file beside it, ``<tile>.weight.fits``. Variances go
out with the cutout (NaN where unknown); pixels with a masked bit (`mask_bits`: plane names,
resolved through the MASK header's ``MP_<NAME>`` keywords or, without them, the HSC/LSST bit
numbers of `HSC_MASK_PLANES`; or bit numbers as text, e.g. ``"12"``) or a zero inverse variance
become missing (NaN), like any non-finite pixel. Band names a file declares (``BANDS = 'g,r,z'`` or
``'grz'``, ``BAND0``..., or per-band ``FILTER``) put its planes in the store's band order.

Safety: every shape and size is checked on headers before data is read or inflated; gzip data
stops inflating past what a cutout of the store's shape can need; a header must reach its END card
within 2.8 MB; nothing after the last HDU is read. A source that cannot be found, or a catalog
without position columns, raises `InputError`: the command line is wrong, no single input is.
Everything else that goes wrong with one input becomes a `Rejected` whose reason says what is wrong
and, where it helps, what to do. Reading may run in worker processes (`workers`), results in
source order.
"""

from __future__ import annotations

import bz2
import csv
import errno
import gzip
import io
import itertools
import math
import multiprocessing
import os
import re
import stat
import sys
import unicodedata
import tempfile
import warnings
import zipfile
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from astropy.io import fits

from infra.errors import InputError
from infra.settings import Settings

__all__ = ["Cutout", "Rejected", "Known", "iter_source", "count_items", "DEFAULT_MASK_BITS", "HSC_MASK_PLANES",
           "storable"]

DEFAULT_MASK_BITS: tuple[str, ...] = Settings.model_fields["mask_bits"].default
# The LSST/HSC pipeline's mask planes, as HSC cutouts number them (their MASK header says so again in
# MP_<NAME> keywords, which win when present).
HSC_MASK_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "DETECTED_NEGATIVE": 6,
                   "SUSPECT": 7, "NO_DATA": 8, "BRIGHT_OBJECT": 9, "CROSSTALK": 10, "NOT_DEBLENDED": 11,
                   "UNMASKEDNAN": 12, "REJECTED": 13, "CLIPPED": 14, "SENSOR_EDGE": 15, "INEXACT_PSF": 16}

_ARRAY_SUFFIXES = (".npy", ".npz")
_ID_COLUMNS = ("object_id", "objid", "id")
_FITS_SUFFIXES = (".fits.gz", ".fits.fz", ".fits.bz2", ".fit.gz", ".fts.gz", ".fits", ".fit", ".fts", ".fz")
_MAX_PIXELS = 1 << 22          # B·H·W of the largest cutout taken when the store's shape is not known yet
_MAX_HDUS = 100
_MAX_HEADER_BLOCKS = 1000      # 2.88 MB: a header longer than that is not a cutout's
_MAX_ID_CHARS = 1024
_MAX_CSV_LINE = 1 << 20        # characters of one catalog line; longer lines are skipped unread
_MAX_FORTRAN_BYTES = 256 << 20
_HELD_BAND_BYTES = 256 << 20   # pixels of per-band files held while their objects are incomplete
_ROLES = {
    "mask": {"MASK", "MSK", "DQ", "BITMASK", "MASKBITS", "FLAGS"},
    "variance": {"VARIANCE", "VAR"},
    "ivar": {"INVVAR", "IVAR", "INV_VAR", "INVVARIANCE", "WEIGHT", "WEIGHTS", "WHT"},
    "ignore": {"PSF"},
}
# band order by wavelength for bands named by their files only
_BAND_ORDER = ("u", "g", "r", "i", "z", "y", "j", "h", "k", "w1", "w2", "w3", "w4")


@dataclass
class Cutout:
    """One good cutout.

    Arguments:
        object_id: the survey's id of the object.
        pixels: (B, H, W) float32, native byte order, every missing pixel NaN (non-finite, masked
            bit, zero inverse variance).
        source: the file it came from (the first of its per-band files).
        ra, dec: sky position in degrees (NaN when the source does not say).
        n_missing: how many pixels are NaN.
        variance: (B, H, W) float32 variance of each pixel in pixel units squared, NaN where unknown
            or missing; None when the source gives none.
        mask: (B, H, W) int32 bit mask as the source gave it (-1 in bands without one); None when
            the source gives none.
        bands: the band names the source declared, in the order of `pixels`; None when it did not.
        inputs: how many inputs (files) it was made of: several for per-band files.
    """

    object_id: str
    pixels: np.ndarray
    source: str
    ra: float = math.nan
    dec: float = math.nan
    n_missing: int = 0
    variance: np.ndarray | None = None
    mask: np.ndarray | None = None
    bands: tuple[str, ...] | None = None
    inputs: int = 1


@dataclass
class Rejected:
    """One unusable input: where it came from, its id when known (else ""), and why it was refused
    (`inputs`: how many files that is, several for an object's per-band files)."""

    source: str
    object_id: str
    reason: str
    inputs: int = 1


@dataclass
class Known:
    """An input whose object id is among the `known` ones (already in the store): not read further."""

    source: str
    object_id: str
    inputs: int = 1


Item = Cutout | Rejected | Known


@dataclass
class _Raw:
    """A cutout as read, before validation: arrays of any dtype and dims; `missing` flags pixels a
    mask or a zero weight says hold no data."""

    object_id: str
    data: np.ndarray
    source: str
    ra: float = math.nan
    dec: float = math.nan
    variance: np.ndarray | None = None
    mask: np.ndarray | None = None
    missing: np.ndarray | None = None
    bands: tuple[str, ...] | None = None


@dataclass
class _Part:
    """One band of one object from a per-band file; `data` is None once dropped to save memory
    (then the file is read again) or when the object is known."""

    object_id: str
    band: str
    source: str
    filter_value: str
    raw: _Raw | None = None
    known: bool = False


@dataclass(frozen=True)
class _Spec:
    """What every cutout must be and how to read it; small and picklable (sent once to each reader process)."""

    n_bands: int | None
    names: tuple[str, ...] | None
    shape: tuple[int, int] | None
    objid_key: str = "OBJID"
    max_missing_frac: float = 0.25
    mask_bits: tuple[str, ...] = DEFAULT_MASK_BITS
    known: np.ndarray | None = field(default=None, compare=False)


def storable(text: str) -> str:
    """`text` as valid UTF-8 text for the store: lone surrogates (undecodable bytes of a file name,
    a broken id) become visible escapes such as ``\\udce9`` instead of failing the write."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def iter_source(source: str, *, bands: int | tuple[str, ...] | None, shape: tuple[int, int] | None,
                objid_key: str = "OBJID", max_missing_frac: float = 0.25, catalog: str | None = None,
                cutout_size: int | None = None, mask_bits: tuple[str, ...] = DEFAULT_MASK_BITS,
                known: np.ndarray | None = None, workers: int = 1, batch: int = 128,
                exclude: Iterable[str] = ()) -> Iterator[Item]:
    """Every object of `source`, validated, in source order: a `Cutout`, a `Rejected` or a `Known` each.

    Arguments:
        source: a directory of FITS cutouts, a FITS file (a tile when `catalog` is given, else one
            cutout or one band of one), or a ``.npy`` / ``.npz`` file.
        bands: the store's band names (then reasons name them and declared bands are put in their
            order), or just a band count; None takes the first good cutout's and enforces it afterwards.
        shape: (H, W) every cutout must have; None takes the first good cutout's.
        objid_key: FITS header keyword holding the object id (the first HDU that has it); without
            it the file stem is the id.
        max_missing_frac: cutouts with a larger fraction of missing pixels are rejected.
        catalog: CSV or FITS table of the objects on a FITS tile.
        cutout_size: H = W of the cutouts cut from a tile (default: `shape`).
        mask_bits: mask planes whose pixels become missing (names or bit numbers as text).
        known: sorted (M,) uint64 `infra.store.id_hash` of ids already in the store: those objects
            come out as `Known` without their pixels being read.
        workers: processes reading in parallel (1: this process). Used for FITS directories and
            tiles when `bands` and `shape` are given; memory is one `batch` of inputs per worker.
        batch: inputs per unit of work handed to a worker process.
        exclude: paths in a source directory that are not inputs (the store and its lock, when
            the store lives inside the directory it ingests).

    Raises:
        InputError: `source` or `catalog` is missing, or the catalog has no position columns.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> np.save(d / "cutouts.npy", np.ones((2, 3, 8, 8), np.float32))
        >>> [c.object_id for c in iter_source(str(d / "cutouts.npy"), bands=3, shape=None)]
        ['cutouts-0', 'cutouts-1']
    """
    path = Path(source)
    if not path.exists():
        raise InputError(str(source), "not found; give a directory of FITS cutouts, a FITS tile with a "
                                      "catalog, or a .npy/.npz file")
    if catalog is not None and not Path(catalog).exists():
        raise InputError(str(catalog), "catalog not found")
    if bands is None or isinstance(bands, (int, np.integer)):
        n_bands, names = (None if bands is None else int(bands)), None
    else:
        n_bands, names = len(bands), tuple(str(b) for b in bands)
    if catalog is not None and not path.is_dir():
        size = (cutout_size, cutout_size) if cutout_size else shape
        if size is None:
            raise InputError(str(source), "a FITS tile needs a cutout size (settings.cutout_size)")
        shape = (int(size[0]), int(size[1]))
    spec = _Spec(n_bands, names, None if shape is None else (int(shape[0]), int(shape[1])), objid_key,
                 max_missing_frac, tuple(mask_bits), None if known is None else np.asarray(known, np.uint64))
    check = _Validator(spec)
    parallel = workers > 1 and spec.n_bands is not None and spec.shape is not None and _can_start_processes()
    if path.is_dir():
        if catalog is not None:
            raise InputError(str(source), "a catalog goes with a FITS tile, not a directory of cutouts")
        yield from _iter_fits_files(_dir_entries(path, exclude), spec, check, workers if parallel else 1, batch)
    elif path.suffix.lower() in _ARRAY_SUFFIXES:
        raw = _iter_npy(path, spec, check) if path.suffix.lower() == ".npy" else _iter_npz(path, spec, check)
        for item in raw:
            yield check(item) if isinstance(item, _Raw) else item
    elif catalog is not None:
        yield from _iter_tile(path, Path(catalog), spec, check, workers if parallel else 1, batch)
    else:
        yield from _iter_fits_files([path], spec, check, 1, batch)


def count_items(source: str, catalog: str | None = None, exclude: Iterable[str] = ()) -> int | None:
    """How many inputs `source` holds (files, array rows, catalog rows), cheaply; None if unknown."""
    try:
        path = Path(source)
        if path.is_dir():
            return len(_dir_entries(path, exclude))
        suffix = path.suffix.lower()
        if suffix == ".npy":
            with open(path, "rb") as f:
                return int(_npy_header(f)[0][0])
        if suffix == ".npz":
            with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
                return int(_npy_header(f)[0][0])
        if catalog is None:
            return 1
        if _is_csv(Path(catalog)):
            with open(catalog, "rb") as f:
                n = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            return max(0, n - 1)
        hdul, table = _open_table(Path(catalog))
        with hdul:
            return int(table.header["NAXIS2"])
    except Exception:  # a progress bar total is a nicety: never fail for it
        return None


# ---- validation ------------------------------------------------------------------------------
def _pct(frac: float, other: float) -> str:
    """`frac` as a percentage, with a decimal when whole percents would read as equal to `other`."""
    a, b = f"{frac:.0%}", f"{other:.0%}"
    return f"{frac:.1%}" if a == b else a


def _normal_band(value) -> str:
    """A band name as compared: lower case, survey prefix off (``HSC-G`` → ``g``), first word of a
    DECam-style ``g DECam SDSS c0001 4720.0 1520.0``."""
    v = str(value).strip().lower()
    v = v.split()[0] if v.split() else v
    for prefix in ("hsc-", "hsc_", "decam-", "des-", "sdss-", "ps1-", "lsst-", "cfht-", "megacam-"):
        if v.startswith(prefix) and len(v) > len(prefix):
            v = v[len(prefix):]
            break
    return v


def _band_index(value, names: tuple[str, ...]) -> int | None:
    """Position of band `value` among `names`, comparing normal forms (``HSC-R2`` matches ``r``)."""
    lowered = [_normal_band(n) for n in names]
    v = _normal_band(value)
    candidates = [v]
    if re.fullmatch(r"[a-z]\d", v):  # HSC-R2 / HSC-I2: the replacement r and i filters
        candidates.append(v[0])
    for c in candidates:
        if c in lowered:
            return lowered.index(c)
    return None


def _generic_names(names: tuple[str, ...]) -> bool:
    """Band names a store got for lack of real ones (b0, b1, ...): any declared names fit them."""
    return all(re.fullmatch(r"b\d+", n) for n in names)


def _wavelength_order(bands) -> list[str]:
    return sorted(bands, key=lambda b: (_BAND_ORDER.index(b) if b in _BAND_ORDER else len(_BAND_ORDER), b))


class _Validator:
    """Turns a `_Raw` into a `Cutout` or a `Rejected`; learns B and (H, W) from the first good one if not given."""

    def __init__(self, spec: _Spec):
        self.n_bands, self.names, self.shape = spec.n_bands, spec.names, spec.shape
        self.given = "store has" if spec.n_bands is not None else "earlier cutouts have"
        self.given_shape = "store has" if spec.shape is not None else "earlier cutouts are"
        self.max_missing_frac = spec.max_missing_frac

    def shape_problem(self, b: int | None, h: int, w: int) -> str | None:
        """Why a (B, H, W) image (B None: one band of a per-band file) cannot go in, read off its header."""
        dims = (h, w) if b is None else (b, h, w)
        if min(dims) <= 0:
            return f"empty image {dims}"
        if self.n_bands is not None and b is not None and b != self.n_bands:
            names = f" ({','.join(self.names)})" if self.names else ""
            return f"{b} bands, {self.given} {self.n_bands}{names}"
        if self.shape is not None and (h, w) != self.shape:
            return (f"cutout {h}x{w} px, {self.given_shape} {self.shape[0]}x{self.shape[1]}; "
                    f"re-cut it to that size")
        if self.shape is None and (b or 1) * h * w > _MAX_PIXELS:
            return (f"image of {(b or 1) * h * w:,} pixels: larger than any cutout ({_MAX_PIXELS:,} at most); "
                    f"a tile? give its catalog with --catalog")
        return None

    def __call__(self, raw: _Raw) -> Cutout | Rejected:
        def reject(reason: str) -> Rejected:
            return Rejected(raw.source, raw.object_id, reason)

        data = raw.data
        if data.dtype.kind not in "biuf":
            return reject(f"pixels of type {data.dtype}: expected numbers")
        planes = {"variance": raw.variance, "mask": raw.mask, "missing": raw.missing}
        if data.ndim == 2:
            data = data[None]
            planes = {k: None if v is None else v[None] for k, v in planes.items()}
        if data.ndim != 3:
            return reject(f"{data.ndim}-D image {tuple(data.shape)}: expected a (B, H, W) cube or one 2-D image per band")
        b, h, w = data.shape
        if (problem := self.shape_problem(b, h, w)) is not None:
            return reject(problem)
        bands = raw.bands if raw.bands is not None and len(raw.bands) == b else None
        if bands is not None and self.names is not None and not _generic_names(self.names):
            where = [_band_index(x, self.names) for x in bands]
            if None in where or len(set(where)) != b:
                return reject(f"bands {','.join(bands)} (from its header), store has {','.join(self.names)}")
            order = np.argsort(where)
            data = data[order]
            planes = {k: None if v is None else v[order] for k, v in planes.items()}
            bands = self.names
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range becomes inf: missing
            pixels = np.array(data, dtype=np.float32)  # a native-endian copy, whatever the file held
        bad = ~np.isfinite(pixels)
        if planes["missing"] is not None:
            bad |= planes["missing"]
        n_missing = int(np.count_nonzero(bad))
        if n_missing == pixels.size:
            return reject("all-NaN cutout (no finite pixel)" if planes["missing"] is None
                          else "no usable pixel (every pixel non-finite, masked or of zero weight)")
        frac = n_missing / pixels.size
        if frac > self.max_missing_frac:
            return reject(f"{_pct(frac, self.max_missing_frac)} missing pixels > "
                          f"{_pct(self.max_missing_frac, frac)} threshold")
        pixels[bad] = np.nan
        variance = None
        if planes["variance"] is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                variance = np.array(planes["variance"], dtype=np.float32)
                variance[~(np.isfinite(variance) & (variance >= 0)) | bad] = np.nan
        mask = None if planes["mask"] is None else np.asarray(planes["mask"]).astype(np.int32)
        if self.n_bands is None:
            self.n_bands = b
        if self.shape is None:
            self.shape = (h, w)
        return Cutout(raw.object_id, pixels, raw.source, float(raw.ra), float(raw.dec), n_missing, variance, mask,
                      bands)


def _id_problem(object_id: str) -> str | None:
    """Why `object_id` cannot be a store key, or None."""
    if not object_id.strip():
        return "empty object id"
    try:
        object_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"object id {object_id!r} is not valid Unicode text (lone surrogate)"
    if any(unicodedata.category(ch) == "Cc" for ch in object_id):  # NUL, newline, escape: they break every output
        return f"object id {object_id[:80]!r} holds control characters"
    if len(object_id) > _MAX_ID_CHARS:
        return f"object id of {len(object_id):,} characters: longer than {_MAX_ID_CHARS}"
    return None


def _is_known(spec: _Spec, object_id: str) -> bool:
    if spec.known is None or not len(spec.known):
        return False
    from infra.store import id_hash  # here, not at the top: reader processes start without zarr

    h = id_hash([object_id])[0]
    i = int(np.searchsorted(spec.known, h))
    return i < len(spec.known) and spec.known[i] == h


# ---- FITS cutouts ----------------------------------------------------------------------------
def _dir_entries(path: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Every input of a directory, by name: each file (hidden ones too), and each subdirectory named
    like a FITS file (quarantined: one odd entry must not vanish in silence); other subdirectories
    and the `exclude` paths skipped."""
    skip = {os.path.realpath(p) for p in exclude}
    with os.scandir(path) as it:
        names = sorted(e.name for e in it
                       if (not _is_dir(e) or e.name.lower().endswith(_FITS_SUFFIXES + (".gz",)))
                       and os.path.realpath(e.path) not in skip)
    return [os.path.join(path, n) for n in names]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _FITS_SUFFIXES + (".gz", ".bz2"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem


def _first_line(e: BaseException | str) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else ""


def _iter_fits_files(files: list, spec: _Spec, check: _Validator, workers: int, batch: int) -> Iterator[Item]:
    """Items of FITS files in order; per-band files joined by object id (see the module doc)."""
    joiner = _BandJoiner(spec, check)
    if workers > 1 and len(files) > batch:
        results = (r for chunk in _in_processes(_read_fits_batch, _batches(files, batch), spec, workers) for r in chunk)
    else:
        results = (_read_fits_path(Path(f), spec, check) for f in files)
    for r in results:
        if isinstance(r, _Part):
            yield from joiner.add(r)
        elif isinstance(r, _Raw):
            yield check(r)
        else:
            yield r
    yield from joiner.finish()


def _batches(items: Iterable, n: int) -> Iterator[list]:
    out: list = []
    for x in items:
        out.append(x)
        if len(out) >= n:
            yield out
            out = []
    if out:
        yield out


# work done in reader processes: module-level so it pickles; the spec arrives once per process
_WORKER: dict = {}


def _init_worker(spec: _Spec) -> None:
    _WORKER["spec"], _WORKER["check"] = spec, _Validator(spec)


def _read_fits_batch(paths: list) -> list:
    spec, check = _WORKER["spec"], _WORKER["check"]
    out = []
    for p in paths:
        r = _read_fits_path(Path(p), spec, check)
        out.append(check(r) if isinstance(r, _Raw) else r)
    return out


def _in_processes(fn: Callable[[list], list], batches: Iterator[list], spec: _Spec, workers: int) -> Iterator[list]:
    """fn(batch) for every batch in `workers` processes, results in batch order; at most one batch in
    flight per worker besides the one the caller holds (flat memory)."""
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe in a process with Prefect's threads
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque = deque((b, pool.submit(fn, b)) for b in itertools.islice(batches, workers))
        while pending:
            batch, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as e:
                # a reader process died (killed, out of memory, a crash in a decompressor): what was
                # appended stays, a re-run skips it; one process finds the file that did it
                raise InputError(_batch_where(batch), "a reader process died while reading these inputs; "
                                                      "ingest again with --workers 1 to find the one to blame") from e
            nxt = next(batches, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield result


def _can_start_processes() -> bool:
    """Whether reader processes can start here: not from a daemonic process (a Dask or pool worker),
    nor from a program read from stdin or a string (spawn re-runs the main module from its file)."""
    if multiprocessing.current_process().daemon:
        return False
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.exists(path)


def _batch_where(batch) -> str:
    """The inputs of a batch, for a message: first and last file, or the tile and its catalog rows."""
    if isinstance(batch, _TileJob):
        rows = [r[0] for r in batch.rows if isinstance(r, tuple)]
        return f"{batch.source} (catalog rows {rows[0]}-{rows[-1]})" if rows else batch.source
    if isinstance(batch, list) and batch:
        return f"{batch[0]} ... {batch[-1]}" if len(batch) > 1 else str(batch[0])
    return str(batch)


def _os_reason(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a symbolic link that loops back on itself"
    if e.errno == errno.ENOENT and path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    if e.errno == errno.EACCES:
        return "permission denied; make it readable"
    return f"unreadable: {type(e).__name__}: {_first_line(e)}"


def _read_fits_path(path: Path, spec: _Spec, check: _Validator) -> _Raw | _Part | Rejected | Known:
    """One FITS file, read as safely as the module doc says; any surprise becomes a `Rejected`."""
    try:
        return _read_fits_file(path, spec, check)
    except OSError as e:
        return Rejected(str(path), _stem(path), _os_reason(path, e))
    except Exception as e:  # last resort: one odd file must never stop an ingest
        return Rejected(str(path), _stem(path), f"unreadable: {type(e).__name__}: {_first_line(e)}")


def _inflate_limit(spec: _Spec) -> int:
    """Bytes a decompressed cutout file may reach: image, mask, variance and weight of the store's
    shape in float64, plus headers (or the largest cutout taken when the shape is not known)."""
    pixels = (spec.n_bands or 1) * spec.shape[0] * spec.shape[1] if spec.shape else _MAX_PIXELS
    return (1 << 20) + 32 * pixels


def _inflate(path: Path, opener, limit: int) -> bytes | str:
    """The decompressed bytes of `path`, or why not (damaged, or past `limit`: a decompression bomb)."""
    out = io.BytesIO()
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 16):
                out.write(chunk)
                if out.tell() > limit:
                    size = os.path.getsize(path)
                    return (f"compressed data inflates past {limit:,} bytes (over {limit // max(size, 1):,}× the "
                            f"{size:,}-byte file), more than a cutout of the store's shape needs: not read further")
    except (EOFError, zlib.error, OSError, ValueError) as e:
        return f"truncated or corrupt compressed data ({_first_line(e)}); fetch the file again"
    return out.getvalue()


def _header_text(peek: Callable[[int, int], bytes], offset: int) -> bytes | None:
    """The header starting at `offset`, up to its END card, if that comes within `_MAX_HEADER_BLOCKS` blocks."""
    text = b""
    for _ in range(_MAX_HEADER_BLOCKS):
        block = peek(offset + len(text), 2880)
        for m in re.finditer(rb"END {5}|END$", block):
            if m.start() % 80 == 0:
                return text + block[: m.start() + 80]
        if len(block) < 2880:
            return None
        text += block
    return None


_SIZE_CARD = re.compile(rb"(NAXIS|ZNAXIS)[0-9]{0,3}|TFIELDS|PCOUNT|GCOUNT|Z?BITPIX|BSCALE|BZERO")
_WHOLE = re.compile(r"[+-]?[0-9]+")


def _header_problem(text: bytes) -> str | None:
    """What in a raw header would send astropy into a loop, an absurd allocation or an arithmetic
    error before any check of ours (FITS 4.0, sect. 4.4.1): NAXIS, ZNAXIS, TFIELDS whole numbers up
    to 999, each NAXISn / ZNAXISn, PCOUNT, GCOUNT whole numbers >= 0, BITPIX one of the six, BSCALE
    and BZERO numbers. Read off the fixed 80-byte cards (astropy's parser costs 10× more per file)."""
    cards: dict[str, str] = {}
    for i in range(0, len(text), 80):
        key = text[i:i + 8].rstrip()
        if _SIZE_CARD.fullmatch(key) and key.decode() not in cards:
            if text[i + 8:i + 10] != b"= ":
                return f"invalid FITS header: {key.decode()} has no value"
            cards[key.decode()] = text[i + 10:i + 80].split(b"/")[0].strip().decode("ascii", "replace")

    def whole(key: str, top: int | None = None, required: bool = False) -> str | int | None:
        if key not in cards:
            return f"invalid FITS header: no {key}" if required else None
        v = cards[key]
        if not _WHOLE.fullmatch(v) or int(v) < 0 or (top is not None and int(v) > top):
            return f"invalid FITS header: {key} = {v}"
        return int(v)

    for prefix in ("NAXIS", "ZNAXIS"):
        n = whole(prefix, 999)
        if isinstance(n, str):
            return n
        for i in range(1, (n or 0) + 1):
            if isinstance(problem := whole(f"{prefix}{i}", required=True), str):
                return problem
    for key, top in (("TFIELDS", 999), ("PCOUNT", None), ("GCOUNT", None)):
        if isinstance(problem := whole(key, top), str):
            return problem
    for key in ("BITPIX", "ZBITPIX"):
        if key in cards and cards[key].lstrip("+") not in ("8", "16", "32", "64", "-32", "-64"):
            return f"invalid FITS header: {key} = {cards[key]}"
    for key in ("BSCALE", "BZERO"):
        if key in cards:
            try:
                if not math.isfinite(float(cards[key].upper().replace("D", "E"))):
                    raise ValueError
            except ValueError:
                return f"invalid FITS header: {key} = {cards[key]}"
    return None


def _open_fits(target, peek: Callable[[int, int], bytes], size: int, memmap: bool) -> tuple[fits.HDUList, list] | str:
    """`target` opened by astropy with its HDUs' headers loaded (`_load_hdus`), or why it is not a
    usable FITS file. The first header is checked before astropy sees it (it reads it on opening)."""
    if not peek(0, 9).startswith(b"SIMPLE  ="):
        return "not a FITS file (no SIMPLE card at its start)"
    text = _header_text(peek, 0)
    if text is None:
        return "not a FITS file (its header has no END card)"
    if (problem := _header_problem(text)) is not None:
        return problem
    try:
        hdul = fits.open(target, memmap=memmap, lazy_load_hdus=True)
    except OSError as e:
        if (end := _promised_end(peek)) is not None and end > size:
            return f"truncated: {size} bytes, its headers say {end}; fetch the file again"
        return f"not a FITS file ({_first_line(e).split('. ')[0]})"
    hdus = _load_hdus(hdul, peek, size)
    if isinstance(hdus, str):
        hdul.close()
        return hdus
    return hdul, hdus


_MISSING = object()


class _Header:
    """An astropy header whose values are looked up once each: a lookup costs ~30 µs (astropy
    parses the card and reads its configuration every time), and a file is asked the same keys often."""

    __slots__ = ("header", "memo")

    def __init__(self, header: fits.Header):
        self.header, self.memo = header, {}

    def get(self, key: str, default=None):
        v = self.memo.get(key, _MISSING)
        if v is _MISSING:
            v = self.memo[key] = self.header.get(key, _MISSING)
        return default if v is _MISSING else v

    def __contains__(self, key: str) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def __getitem__(self, key: str):
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise KeyError(key)
        return v


class _HDU:
    """An astropy HDU with a `_Header`; `hdu` is the HDU itself (data, section)."""

    __slots__ = ("hdu", "header")

    def __init__(self, hdu):
        self.hdu, self.header = hdu, _Header(hdu.header)

    @property
    def is_image(self) -> bool:
        return self.hdu.is_image

    @property
    def data(self):
        return self.hdu.data


def _load_hdus(hdul: fits.HDUList, peek: Callable[[int, int], bytes], size: int) -> list | str:
    """The HDUs of `hdul`, headers only, loaded one by one while each next header looks real; or why
    the file is not a usable FITS file. Nothing past the last HDU is read (trailing padding or junk)."""
    hdus: list = []
    offset = 0
    while offset < size:
        head = peek(offset, 80)
        if offset == 0 and not head.startswith(b"SIMPLE  ="):
            return "not a FITS file (no SIMPLE card at its start)"
        if offset and not head.startswith(b"XTENSION="):
            break
        if len(hdus) >= _MAX_HDUS:
            return f"more than {_MAX_HDUS} HDUs: not a cutout"
        if offset:  # the primary header was checked before astropy opened the file
            text = _header_text(peek, offset)
            if text is None:
                return f"truncated: extension {len(hdus)} stops inside its header; fetch the file again"
            if (problem := _header_problem(text)) is not None:
                return problem
        try:
            hdu = hdul[len(hdus)]
        except IndexError:
            break
        info = hdu.fileinfo()  # the HDU's own: HDUList.fileinfo reads every header to the end of the file
        start, span = int(info["datLoc"]), int(info["datSpan"])
        wrapped = _HDU(hdu)
        # a compressed image's header describes the inflated image; its bytes on disk are the (padded) table
        need = start + (max(0, span - 2879) if isinstance(hdu, fits.CompImageHDU) else _data_bytes(wrapped.header))
        if need > size:
            return f"truncated: {size} bytes, its headers say {need}; fetch the file again"
        hdus.append(wrapped)
        offset = start + span
    return hdus


def _data_bytes(header) -> int:
    """Bytes of data an HDU's header promises, padding aside (FITS 4.0, sect. 4.4.1.1: |BITPIX|/8 ×
    GCOUNT × (PCOUNT + NAXIS1 × … × NAXISn))."""
    shape = _header_shape(header)
    n = int(np.prod(shape, dtype=object)) if shape and not isinstance(shape, str) else 0
    return abs(int(header.get("BITPIX", 8))) // 8 * int(header.get("GCOUNT", 1)) * (int(header.get("PCOUNT", 0)) + n)


def _promised_end(peek: Callable[[int, int], bytes]) -> int | None:
    """Where the primary HDU's data end by its header, for a reason when astropy cannot open it."""
    text = _header_text(peek, 0)
    if text is None or _header_problem(text) is not None:
        return None
    text += b" " * (-len(text) % 2880)
    try:
        header = fits.Header.fromstring(text.decode("ascii", "replace"))
        return None if isinstance(_header_shape(header), str) else len(text) + _data_bytes(header)
    except Exception:  # no reason better than astropy's, then
        return None


def _role(hdu) -> str:
    h = hdu.header
    names = {str(h.get(k, "")).strip().upper() for k in ("EXTNAME", "EXTTYPE", "IMAGETYP")}
    for role, keys in _ROLES.items():
        if names & keys:
            return role
    return "science"


def _is_image(hdu) -> bool:
    return hdu.is_image and _naxis(hdu.header) > 0


def _naxis(header) -> int:
    n = header.get("NAXIS", 0)
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 999 else -1


def _header_shape(header) -> tuple[int, ...] | str:
    """Numpy-order shape promised by an image header, or why it is not one."""
    n = _naxis(header)
    if n < 0:
        return f"invalid FITS header: NAXIS = {header.get('NAXIS')!r}"
    dims = []
    for i in range(n, 0, -1):
        v = header.get(f"NAXIS{i}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"invalid FITS header: NAXIS{i} = {v!r}"
        dims.append(v)
    return tuple(dims)


def _header_id(hdus: list, key: str) -> str | None:
    for hdu in hdus:
        if key in hdu.header:
            value = str(hdu.header[key]).strip()
            if value:
                return value
    return None


def _filter_value(hdus: list, science) -> str | None:
    for h in (science, hdus[0]):
        v = h.header.get("FILTER")
        if v is not None and str(v).strip():
            return str(v).strip()
    return None


def _declared_bands(science: list, spec: _Spec) -> tuple[str, ...] | None:
    """Band names the file declares for its planes: BANDS / BANDn keywords of a cube, FILTER (or an
    EXTNAME that is a store band) of each per-band HDU; None when it declares none."""
    if len(science) == 1:
        h = science[0].header
        b = (h.get("NAXIS3") if _naxis(h) == 3 else 1) or 1
        if "BANDS" in h:
            text = str(h["BANDS"]).strip()
            names = [x.strip() for x in text.split(",")] if "," in text else list(text)
            return tuple(_normal_band(x) for x in names if x)
        if all(f"BAND{i}" in h for i in range(b)):
            return tuple(_normal_band(h[f"BAND{i}"]) for i in range(b))
        return None
    if all("FILTER" in h.header for h in science):
        return tuple(_normal_band(h.header["FILTER"]) for h in science)
    names = tuple(_normal_band(h.header.get("EXTNAME", "")) for h in science)
    if spec.names and all(_band_index(n, spec.names) is not None for n in names):
        return names
    return None


def _mask_bitmask(header, mask_bits: tuple[str, ...]) -> int:
    """The bits of `mask_bits` as this mask HDU numbers them (MP_<NAME> keywords, else the HSC planes)."""
    out = 0
    for name in mask_bits:
        name = str(name).strip().upper()
        if name.isdigit():
            bit = int(name)
        else:
            v = header.get(f"MP_{name}", HSC_MASK_PLANES.get(name))
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            bit = v
        if 0 <= bit < 63:
            out |= 1 << bit
    return out


def _plane_problem(role: str, hdus: list, b: int, h: int, w: int) -> str | None:
    shapes = [_header_shape(x.header) for x in hdus]
    ok = (len(hdus) == 1 and shapes[0] in ((b, h, w), (h, w) if b == 1 else None)) or \
         (len(hdus) == b and all(s == (h, w) for s in shapes))
    if ok:
        return None
    return f"{role} HDU{'s' if len(hdus) > 1 else ''} of shape {', '.join(map(str, shapes))} do not match the image ({b}, {h}, {w})"


def _stack(hdus: list, b: int) -> np.ndarray:
    arrays = [np.asarray(x.data) for x in hdus]
    a = arrays[0] if len(arrays) == 1 else np.stack(arrays)
    return a.reshape((b,) + a.shape[-2:])


def _planes(hdus: list, science_shape: tuple[int, int, int], spec: _Spec, roles: dict) -> tuple:
    """(variance, mask, missing) arrays shaped like the science, from the file's role HDUs."""
    b = science_shape[0]
    variance = mask = missing = None
    if roles.get("mask"):
        mask = _stack(roles["mask"], b).astype(np.int64)
        bits = [_mask_bitmask(x.header, spec.mask_bits) for x in roles["mask"]]
        per_band = np.asarray(bits if len(bits) == b else bits * b, dtype=np.int64)[:, None, None]
        missing = (mask & per_band) != 0
        mask = mask.astype(np.int32)
    if roles.get("variance"):
        variance = _stack(roles["variance"], b)
    elif roles.get("ivar"):
        ivar = np.asarray(_stack(roles["ivar"], b), dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = np.where(ivar > 0, 1.0 / ivar, np.nan)
        zero = ivar == 0  # no data there (a NaN weight says nothing about the pixel)
        missing = zero if missing is None else missing | zero
    return variance, mask, missing


def _read_fits_file(path: Path, spec: _Spec, check: _Validator) -> _Raw | _Part | Rejected | Known:
    src, stem = str(path), _stem(path)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return Rejected(src, stem, "a directory, not a FITS file; ingest it on its own: gsafe ingest DIR")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        return Rejected(src, stem, f"not a regular file ({kind}): not read")
    if st.st_size == 0:
        return Rejected(src, stem, "empty file (0 bytes): not a FITS file")
    with open(path, "rb") as f:
        magic = f.read(4)
        opener = gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic[:3] == b"BZh" else None
        if magic == b"PK\x03\x04":
            return Rejected(src, stem, "a zip archive, not a FITS file; unzip it first")
        if opener is not None:
            data = _inflate(path, opener, _inflate_limit(spec))
            if isinstance(data, str):
                return Rejected(src, stem, data)
            fileobj, size = io.BytesIO(data), len(data)

            def peek(off: int, n: int) -> bytes:
                return data[off:off + n]
        else:
            f.seek(0)
            fileobj, size = f, st.st_size
            fd = f.fileno()

            def peek(off: int, n: int) -> bytes:
                return os.pread(fd, n, off)
        return _read_fits_hdus(fileobj, peek, size, src, stem, spec, check)


def _read_fits_hdus(fileobj, peek, size: int, src: str, stem: str, spec: _Spec,
                    check: _Validator) -> _Raw | _Part | Rejected | Known:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened = _open_fits(fileobj, peek, size, memmap=False)
        if isinstance(opened, str):
            return Rejected(src, stem, opened)
        hdul, hdus = opened
        with hdul:
            # astropy's "may have been truncated" counts the final padding; `_load_hdus` checked the data itself
            damaged = [str(w.message) for w in caught
                       if "corrupt" in str(w.message) or ("truncated" in str(w.message) and "actual file length"
                                                          not in str(w.message))]
            if damaged:
                return Rejected(src, stem, f"truncated or corrupt: {_first_line(damaged[0])}; fetch the file again")
            # no astropy `verify`: a card it would refuse but gsafe never reads is no reason to lose a cutout
            return _read_verified(hdus, src, stem, spec, check)


def _read_verified(hdus: list, src: str, stem: str, spec: _Spec, check: _Validator) -> _Raw | _Part | Rejected | Known:
    images = [h for h in hdus if _is_image(h)]
    for h in hdus:
        if isinstance(s := _header_shape(h.header), str):
            return Rejected(src, stem, s)
    science = [h for h in images if _role(h) == "science"]
    roles: dict[str, list] = {}
    for h in images:
        roles.setdefault(_role(h), []).append(h)
    if not science:
        return Rejected(src, _header_id(hdus, spec.objid_key) or stem, "no image data in any HDU")
    single_plane = len(science) == 1 and _naxis(science[0].header) == 2 and spec.n_bands != 1
    flt = _filter_value(hdus, science[0]) if single_plane else None  # (each lookup costs: only when it matters)
    per_band = single_plane and flt is not None
    object_id = _header_id(hdus, spec.objid_key)
    if object_id is None and per_band:
        object_id = _id_without_filter(stem, flt)
    object_id = object_id or stem
    if (problem := _id_problem(object_id)) is not None:
        return Rejected(src, object_id, problem)
    shapes = [_header_shape(h.header) for h in science]
    if per_band:
        band = _normal_band(flt)
        if spec.names is not None and not _generic_names(spec.names) and _band_index(band, spec.names) is None:
            return Rejected(src, object_id, f"FILTER {flt!r} is none of the store's bands ({','.join(spec.names)})")
        if _is_known(spec, object_id):
            return _Part(object_id, band, src, flt, known=True)
        if (problem := check.shape_problem(None, *shapes[0])) is not None:
            return Rejected(src, object_id, problem)
        b, (h, w) = 1, shapes[0]
    else:
        if _is_known(spec, object_id):
            return Known(src, object_id)
        if len(science) == 1:
            s = shapes[0]
            if len(s) not in (2, 3):
                return Rejected(src, object_id, f"{len(s)}-D image {s}: expected a (B, H, W) cube or one 2-D "
                                                f"image per band")
            b, h, w = (1,) + s if len(s) == 2 else s
        else:
            if any(len(s) != 2 for s in shapes):
                return Rejected(src, object_id, "mixes 2-D and other image HDUs: expected a (B, H, W) cube or "
                                                "one 2-D image per band")
            if len(set(shapes)) > 1:
                return Rejected(src, object_id, f"band images differ in shape: {sorted(set(shapes))}")
            b, (h, w) = len(science), shapes[0]
        if (problem := check.shape_problem(b, h, w)) is not None:
            return Rejected(src, object_id, problem)
    for role in ("mask", "variance", "ivar"):
        if roles.get(role) and (problem := _plane_problem(role, roles[role], b, h, w)) is not None:
            return Rejected(src, object_id, problem)
    data = _stack(science, b)  # the one place pixels are read (and inflated), every check done
    variance, mask, missing = _planes(hdus, (b, h, w), spec, roles)
    ra, dec = _header_position(science[0].header)
    if per_band:
        raw = _Raw(object_id, data[0], src, ra, dec, None if variance is None else variance[0],
                   None if mask is None else mask[0], None if missing is None else missing[0])
        return _Part(object_id, _normal_band(flt), src, flt, raw)
    return _Raw(object_id, data, src, ra, dec, variance, mask, missing, _declared_bands(science, spec))


def _id_without_filter(stem: str, flt: str) -> str:
    """A per-band file's stem less its FILTER value (``HSC-G``, or the band ``g``), taken where it
    stands between separators (its last such place), and the separators around it: the object's id."""
    words = flt.split()
    for token in sorted({flt, words[0] if words else flt, _normal_band(flt)}, key=len, reverse=True):
        found = list(re.finditer(r"(?:^|(?<=[-_. ]))" + re.escape(token) + r"(?=$|[-_. ])", stem, re.IGNORECASE))
        if found:
            m = found[-1]
            rest = (stem[:m.start()].rstrip("-_. "), stem[m.end():].lstrip("-_. "))
            joined = "-".join(x for x in rest if x)
            if joined:
                return joined
    return stem


def _header_position(header: fits.Header) -> tuple[float, float]:
    """(ra, dec) in degrees: RA/DEC keywords, else the WCS at the cutout centre, else NaN."""
    try:
        if "RA" in header and "DEC" in header:
            return float(header["RA"]), float(header["DEC"])
        from astropy.wcs import WCS  # here: most cutouts say RA, DEC, and reader processes start faster

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(getattr(header, "header", header)).celestial
        if wcs.has_celestial and wcs.naxis == 2:
            ny, nx = int(header[f"NAXIS{wcs.wcs.lat + 1}"]), int(header[f"NAXIS{wcs.wcs.lng + 1}"])
            ra, dec = wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
            return float(ra), float(dec)
    except Exception:  # a position is a nicety here: a cutout without one still counts
        pass
    return math.nan, math.nan


class _BandJoiner:
    """Joins per-band files (`_Part`) of one object into one cutout.

    An object comes out as soon as it has every band (the store's names, or `n_bands` distinct
    FILTERs); objects still incomplete at the end come out as rejections. With no band count known
    (a new store), every object waits for the end and the bands are every FILTER seen. Pixels of
    waiting objects are held up to `_HELD_BAND_BYTES`; beyond, the oldest are dropped and their
    files read again when the object completes.
    """

    def __init__(self, spec: _Spec, check: _Validator):
        self.spec, self.check = spec, check
        self.names = spec.names if spec.names and not _generic_names(spec.names) else None
        self.groups: dict[str, dict[str, _Part]] = {}
        self.done: set[int] = set()  # id hashes of objects already joined in this run
        self.held = 0

    def _complete(self, parts: dict[str, _Part]) -> bool:
        if self.names is not None:
            return {self._slot(b) for b in parts} == set(range(len(self.names)))
        return self.spec.n_bands is not None and len(parts) == self.spec.n_bands

    def _slot(self, band: str) -> int:
        return _band_index(band, self.names)

    def add(self, part: _Part) -> list[Item]:
        key = part.band if self.names is None else self.names[self._slot(part.band)]
        from infra.store import id_hash

        h = int(id_hash([part.object_id])[0])
        parts = self.groups.setdefault(part.object_id, {})
        if key in parts or h in self.done:
            if not parts:
                del self.groups[part.object_id]
            return [Rejected(part.source, part.object_id, f"a second file for band {key} of object {part.object_id!r}; "
                                                          f"not used")]
        parts[key] = part
        if part.raw is not None:
            self.held += part.raw.data.nbytes
        if self._complete(parts):
            del self.groups[part.object_id]
            self.done.add(h)
            return [self._join(part.object_id, parts, self._order(parts))]
        self._shed()
        return []

    def _order(self, parts: dict[str, _Part]) -> list[str]:
        return list(self.names) if self.names is not None else _wavelength_order(parts)

    def _shed(self) -> None:
        for parts in self.groups.values():
            if self.held <= _HELD_BAND_BYTES:
                return
            for p in parts.values():
                if p.raw is not None:
                    self.held -= p.raw.data.nbytes
                    p.raw = None

    def finish(self) -> Iterator[Item]:
        every = None
        if self.names is None and self.spec.n_bands is None:
            every = _wavelength_order({b for parts in self.groups.values() for b in parts})
        for oid, parts in self.groups.items():
            order = every or self._order(parts)
            missing = [b for b in order if b not in parts]
            first = min(p.source for p in parts.values())
            if any(p.known for p in parts.values()):
                yield Known(first, oid, len(parts))
            elif missing:
                have = [b for b in order if b in parts] if self.names or every else _wavelength_order(parts)
                what = (f"missing band{'s' if len(missing) > 1 else ''} {', '.join(missing)}" if self.names or every
                        else f"{len(parts)} of {self.spec.n_bands} bands")
                yield Rejected(first, oid, f"{what}: no file with that FILTER for this object (has {', '.join(have)})",
                               len(parts))
            else:
                yield self._join(oid, parts, order)
        self.groups = {}

    def _join(self, oid: str, parts: dict[str, _Part], order: list[str]) -> Item:
        first = min(p.source for p in parts.values())
        if any(p.known for p in parts.values()):
            return Known(first, oid, len(parts))
        raws = []
        for band in order:
            p = parts[band]
            if p.raw is None:  # dropped to save memory: read the file again
                again = _read_fits_path(Path(p.source), self.spec, self.check)
                if not isinstance(again, _Part) or again.raw is None:
                    return Rejected(p.source, oid, again.reason if isinstance(again, Rejected)
                                    else "changed while being read; ingest again", len(parts))
                p = again
            else:
                self.held -= p.raw.data.nbytes
            raws.append(p.raw)
        shapes = {r.data.shape for r in raws}
        if len(shapes) > 1:
            return Rejected(first, oid, "band files differ in shape: " +
                            ", ".join(f"{b} {r.data.shape[0]}x{r.data.shape[1]}" for b, r in zip(order, raws)))
        h, w = raws[0].data.shape

        def stack(attr: str, fill) -> np.ndarray | None:
            planes = [getattr(r, attr) for r in raws]
            if all(x is None for x in planes):
                return None
            return np.stack([np.full((h, w), fill) if x is None else x for x in planes])

        joined = _Raw(oid, np.stack([r.data for r in raws]), first, raws[0].ra, raws[0].dec,
                      stack("variance", np.nan), stack("mask", -1), stack("missing", False), tuple(order))
        out = self.check(joined)
        out.inputs = len(parts)
        return out


# ---- arrays ----------------------------------------------------------------------------------
def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(f)


def _array_problem(shape: tuple[int, ...], dtype: np.dtype, check: _Validator) -> str | None:
    """Why an (N, B, H, W) array cannot be cutouts, from its header alone (one reason for all its rows)."""
    if len(shape) != 4:
        hint = "; add a band axis: a[:, None]" if len(shape) == 3 else ""
        return f"array of shape {tuple(shape)}: expected (N, B, H, W) cutouts{hint}"
    n, b, h, w = shape
    if dtype.kind not in "biuf":
        return f"pixels of type {dtype}: expected numbers"
    if n and min(b, h, w) == 0:
        return f"array of {n} cutouts of {b} bands, {h}x{w} px holds no pixels"
    if n and (problem := check.shape_problem(b, h, w)) is not None:
        return f"{problem} (all {n} cutouts of the array)"
    return None


def _iter_npy(path: Path, spec: _Spec, check: _Validator, block_bytes: int = 16 << 20) -> Iterator[_Raw | Rejected | Known]:
    """Rows of an (N, B, H, W) .npy file, read in blocks of ~`block_bytes` with plain reads.

    Not memory-mapped: pages of a mapped file count in the reader's RSS until unmapped, so
    ingesting a 20 GB source would look like a 20 GB process. Fortran-ordered arrays (rows not
    contiguous) fall back to a memory map.
    """
    src, stem = str(path), path.stem
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Rejected(src, "", f"unreadable .npy: {type(e).__name__}: {_first_line(e)}")
        return
    with f:
        try:
            shape, fortran, dtype = _npy_header(f)
            if dtype.hasobject:
                raise ValueError("object arrays are not cutouts (pickled data is never loaded)")
        except Exception as e:
            yield Rejected(src, "", f"unreadable .npy: {type(e).__name__}: {_first_line(e)}")
            return
        if (problem := _array_problem(shape, dtype, check)) is not None:
            yield Rejected(src, "", problem)
            return
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        need, have = shape[0] * row, os.fstat(f.fileno()).st_size - f.tell()
        if have < need:
            yield Rejected(src, "", f"unreadable .npy: ValueError: file is truncated: {have} bytes of data, "
                                    f"the header promises {need}")
            return
        if fortran:
            images = np.load(path, mmap_mode="r", allow_pickle=False)
            for i in range(len(images)):
                yield _row(spec, f"{stem}-{i}", src, lambda: np.asarray(images[i]))
            return
        per_block = max(1, block_bytes // max(row, 1))
        for start in range(0, shape[0], per_block):
            k = min(per_block, shape[0] - start)
            block = np.fromfile(f, dtype=dtype, count=k * (row // dtype.itemsize)).reshape((k,) + tuple(shape[1:]))
            for j in range(k):
                yield _row(spec, f"{stem}-{start + j}", src, lambda: block[j])


def _row(spec: _Spec, oid: str, src: str, data: Callable[[], np.ndarray], **extra) -> _Raw | Rejected | Known:
    if (problem := _id_problem(oid)) is not None:
        return Rejected(src, oid, problem)
    if _is_known(spec, oid):
        return Known(src, oid)
    return _Raw(oid, data(), src, **extra)


def _member_rows(zf: zipfile.ZipFile, name: str, n: int, kinds: str) -> Iterator[np.ndarray] | str:
    """Rows of member `name` of an .npz, read one at a time off the zip stream; or why they cannot be."""
    f = zf.open(f"{name}.npy")
    shape, fortran, dtype = _npy_header(f)
    if dtype.hasobject or dtype.kind not in kinds:
        f.close()
        return f"'{name}' of type {dtype}: expected {'numbers' if 'U' not in kinds else 'text or integers'}"
    if len(shape) == 0 or shape[0] != n:
        f.close()
        return f"'{name}' has {shape[0] if shape else 0} entries, 'images' {n}: they must align"
    row_shape = tuple(shape[1:])
    nbytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    if fortran and len(shape) > 1:
        f.close()
        return f"'{name}' is Fortran-ordered: save it C-ordered (np.ascontiguousarray) to be read in pieces"

    def rows() -> Iterator[np.ndarray]:
        with f:
            for _ in range(n):
                buf = f.read(nbytes)
                if len(buf) != nbytes:
                    raise ValueError(f"'{name}' ends early: truncated .npz")
                yield np.frombuffer(buf, dtype=dtype).reshape(row_shape)

    return rows()


def _iter_npz(path: Path, spec: _Spec, check: _Validator) -> Iterator[_Raw | Rejected | Known]:
    src, stem = str(path), path.stem
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m[:-4] for m in zf.namelist() if m.endswith(".npy")]
            if "images" not in members:
                yield Rejected(src, "", f"no 'images' array in .npz (has: {', '.join(members) or 'nothing'})")
                return
            with zf.open("images.npy") as f:
                shape, fortran, dtype = _npy_header(f)
            if (problem := _array_problem(shape, dtype, check)) is not None:
                yield Rejected(src, "", problem)
                return
            n = shape[0]
            if fortran and n * int(np.prod(shape[1:])) * dtype.itemsize > _MAX_FORTRAN_BYTES:
                yield Rejected(src, "", "'images' is Fortran-ordered and large: save it C-ordered "
                                        "(np.ascontiguousarray) to be read in pieces")
                return
            streams: dict[str, Iterator] = {}
            for name, kinds in (("ids", "USiu"), ("ra", "fiu"), ("dec", "fiu"), ("variance", "fiu"), ("mask", "iub")):
                if name in members:
                    rows = _member_rows(zf, name, n, kinds)
                    if isinstance(rows, str):
                        yield Rejected(src, "", rows)
                        return
                    streams[name] = rows
            for name in ("variance", "mask"):
                if name in streams:
                    with zf.open(f"{name}.npy") as f:
                        if tuple(_npy_header(f)[0]) != tuple(shape):
                            yield Rejected(src, "", f"'{name}' is not shaped like 'images' {tuple(shape)}")
                            return
            images = _images_rows(path, zf, shape, fortran, dtype)
            for i, data in enumerate(images):
                extra = {k: next(v) for k, v in streams.items()}
                oid = _text(extra["ids"]) if "ids" in extra else f"{stem}-{i}"
                yield _row(spec, oid, src, lambda: data, ra=float(extra.get("ra", math.nan)),
                           dec=float(extra.get("dec", math.nan)), variance=extra.get("variance"),
                           mask=extra.get("mask"))
    except Exception as e:
        yield Rejected(src, "", f"unreadable .npz: {type(e).__name__}: {_first_line(e)}")


def _text(value) -> str:
    v = value.item() if isinstance(value, np.ndarray) else value
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    return str(v)


def _images_rows(path: Path, zf: zipfile.ZipFile, shape, fortran: bool, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Rows of the ``images`` member read one at a time off the zip stream (no mmap for .npz)."""
    if fortran:  # rows are not contiguous: the one layout that needs the whole array (bounded above)
        with np.load(path, allow_pickle=False) as z:
            yield from z["images"]
        return
    with zf.open("images.npy") as f:
        _npy_header(f)
        row_shape = tuple(shape[1:])
        nbytes = int(np.prod(row_shape)) * dtype.itemsize
        for _ in range(shape[0]):
            buf = f.read(nbytes)
            if len(buf) != nbytes:
                raise ValueError("'images' ends early: truncated .npz")
            yield np.frombuffer(buf, dtype=dtype).reshape(row_shape)


# ---- FITS tile + catalog ---------------------------------------------------------------------
def _is_csv(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".txt")


def _open_table(path: Path) -> tuple[fits.HDUList, fits.BinTableHDU | fits.TableHDU]:
    """A FITS catalog opened with the cutouts' safety checks (`_open_fits`), and its first table."""
    with open(path, "rb") as f:
        fd = f.fileno()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = _open_fits(str(path), lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size, memmap=True)
    if isinstance(opened, str):
        raise InputError(str(path), f"unreadable FITS catalog: {opened}")
    hdul, hdus = opened
    for h in hdus:
        if isinstance(h.hdu, (fits.BinTableHDU, fits.TableHDU)) and not isinstance(h.hdu, fits.CompImageHDU):
            return hdul, h.hdu
    hdul.close()
    raise InputError(str(path), "no table HDU in the FITS catalog")


class _Lines:
    """Physical lines of a text file, each at most `cap` characters read: a longer line is skipped
    (read in pieces, never held) and given to csv as an empty line, its number kept in `overlong`."""

    def __init__(self, f, cap: int = _MAX_CSV_LINE):
        self.f, self.cap, self.n, self.overlong = f, cap, 0, set()

    def __iter__(self):
        while True:
            line = self.f.readline(self.cap)
            if not line:
                return
            self.n += 1
            if len(line) >= self.cap and not line.endswith("\n"):
                while (rest := self.f.readline(self.cap)) and not rest.endswith("\n"):
                    pass
                self.overlong.add(self.n)
                line = "\n"
            yield line


def _bad_byte(text: str) -> int | None:
    """The first undecodable byte (kept as a surrogate escape) in `text`, or None."""
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            return ord(ch) - 0xDC00
    return None


def _catalog(path: Path, objid_key: str) -> tuple[set[str], Iterator[tuple[int, dict | str]]]:
    """(the keys it has among id, ra, dec, x, y; its rows as (index, {key: value}) or (index, reason))."""
    if _is_csv(path):
        f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
        lines = _Lines(f)
        reader = csv.reader(iter(lines))
        try:
            header = [h.strip() for h in next(reader, [])]
        except csv.Error as e:
            f.close()
            raise InputError(str(path), f"unreadable catalog header: {e}") from e
        if 1 in lines.overlong:
            f.close()
            raise InputError(str(path), f"catalog header longer than {_MAX_CSV_LINE:,} characters: not a CSV table")
        at = {h.lower(): i for i, h in enumerate(header)}

        def records():
            with f:
                i = 0
                while True:
                    try:
                        r = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as e:
                        msg = str(e).replace("field larger than field limit", "a field longer than the limit of")
                        yield i, f"catalog line {reader.line_num}: {msg} characters; not a catalog row"
                        i += 1
                        continue
                    if reader.line_num in lines.overlong:
                        yield i, f"catalog line {reader.line_num}: longer than {_MAX_CSV_LINE:,} characters; not a catalog row"
                        i += 1
                        continue
                    if any(s.strip() for s in r):
                        yield i, (lambda c, r=r: r[at[c]].strip() if at[c] < len(r) else "")
                        i += 1
    else:
        hdul, table = _open_table(path)
        try:
            header = list(table.columns.names)
        except Exception as e:
            hdul.close()
            raise InputError(str(path), f"unreadable FITS catalog: {type(e).__name__}: {_first_line(e)}") from e
        at = {h.lower(): h for h in header}

        def records():
            with hdul:
                data = table.data
                for i in range(len(data)):
                    try:
                        r = data[i]
                        yield i, (lambda c, r=r: r[at[c]])
                    except Exception as e:
                        yield i, f"catalog row {i}: unreadable: {type(e).__name__}: {_first_line(e)}"
    keys = {k: k for k in ("ra", "dec", "x", "y") if k in at}
    id_col = next((c for c in (*_ID_COLUMNS, objid_key.lower()) if c in at), None)
    if id_col:
        keys["id"] = id_col
    if not ({"ra", "dec"} <= set(keys) or {"x", "y"} <= set(keys)):
        has = storable(", ".join(header))
        raise InputError(str(path), f"catalog needs columns ra, dec (degrees) or x, y (0-based pixels); "
                                    f"it has {ascii(has[:200]) if has.strip() else 'none'}")

    def rows():
        for i, get in records():
            if isinstance(get, str):
                yield i, get
                continue
            try:
                rec = {k: get(c) for k, c in keys.items()}
            except Exception as e:
                yield i, f"catalog row {i}: unreadable: {type(e).__name__}: {_first_line(e)}"
                continue
            bad = next((b for v in rec.values() if isinstance(v, str) and (b := _bad_byte(v)) is not None), None)
            if bad is not None:
                yield i, f"catalog row {i}: not UTF-8 text (byte 0x{bad:02x}); save the catalog as UTF-8"
                continue
            yield i, rec

    return set(keys), rows()


@dataclass
class _TileJob:
    """A batch of catalog rows to cut from one tile: (row index, object id, a, b) or a ready `Rejected`."""

    source: str
    readable: str
    weight: str | None
    use_radec: bool
    rows: list


class _Tile:
    """An open tile: its science HDU, mask / variance / weight planes, WCS; cuts read only their pixels
    (memory map for plain files, tile-by-tile inflation for compressed ones)."""

    def __init__(self, path: str, weight: str | None, spec: _Spec):
        from astropy.wcs import WCS

        self.path, self.spec = path, spec
        self.tmp = None
        src = path
        with open(path, "rb") as f:
            magic = f.read(4)
        opener = gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic[:3] == b"BZh" else None
        if opener is not None:  # a whole-file-compressed tile is inflated once, to disk, never into memory
            self.tmp = tempfile.NamedTemporaryFile(prefix="gsafe-tile-", suffix=".fits")
            limit = max(256 << 20, 200 * os.path.getsize(path))
            with opener(path, "rb") as fin:
                copied = 0
                while chunk := fin.read(1 << 20):
                    copied += len(chunk)
                    if copied > limit:
                        raise ValueError(f"compressed tile inflates past {limit:,} bytes (200× its size): not read further")
                    self.tmp.write(chunk)
            self.tmp.flush()
            src = self.tmp.name
        self.readable = src  # what reader processes open (the inflated copy of a compressed tile)
        self.file = open(src, "rb")
        size = os.fstat(self.file.fileno()).st_size
        fd = self.file.fileno()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = _open_fits(src, lambda off, n: os.pread(fd, n, off), size, memmap=True)
            if isinstance(opened, str):
                raise _TileError(f"unreadable FITS tile: {opened}")
            self.hdul, hdus = opened
            images = [h for h in hdus if _is_image(h)]
            science = [h for h in images if _role(h) == "science"]
            if not science:
                raise _TileError("no image data: a tile is a 2-D image or a (B, H, W) cube")
            self.sci = science[0]
            shape = _header_shape(self.sci.header)
            if isinstance(shape, str) or len(shape) not in (2, 3):
                raise _TileError(f"{shape if isinstance(shape, str) else f'{len(shape)}-D image'}: "
                                 f"a tile is a 2-D image or a (B, H, W) cube")
            self.shape = shape
            self.planes: dict[str, object] = {}
            for h in images:
                role = _role(h)
                if role in ("mask", "variance", "ivar") and role not in self.planes and _header_shape(h.header) == shape:
                    self.planes[role] = h
            if weight is not None and "ivar" not in self.planes and "variance" not in self.planes:
                self.weight_file = open(weight, "rb")
                wfd = self.weight_file.fileno()
                opened = _open_fits(weight, lambda off, n: os.pread(wfd, n, off), os.fstat(wfd).st_size, memmap=True)
                w = None if isinstance(opened, str) else next((h for h in opened[1] if _is_image(h)), None)
                if w is None or _header_shape(w.header) != shape:
                    why = opened if isinstance(opened, str) else f"no image of the tile's shape {shape}"
                    raise _TileError(f"weight map {weight} beside the tile is unusable ({why}); fix or move it")
                self.weight, self.planes["ivar"] = opened[0], w
            wcs = WCS(self.sci.hdu.header).celestial
        self.wcs = wcs if wcs.has_celestial else None
        self.bands = _declared_bands([self.sci], spec) if len(shape) == 3 else None

    def cut(self, sy: slice, sx: slice) -> tuple:
        """(data, variance, mask, missing) of the region, (B, h, w) or (h, w) like the tile."""
        def read(hdu):
            where = (sy, sx) if len(self.shape) == 2 else (slice(None), sy, sx)
            if isinstance(hdu.hdu, fits.CompImageHDU) or any(k in hdu.header for k in ("BSCALE", "BZERO", "BLANK")):
                return np.asarray(hdu.hdu.section[where])  # inflates / scales only the tiles or rows it needs
            return np.array(hdu.data[where])  # a memory map: reads the region's pages only

        data = read(self.sci)
        variance = mask = missing = None
        if "mask" in self.planes:
            m = self.planes["mask"]
            mask = read(m).astype(np.int64)
            missing = (mask & _mask_bitmask(m.header, self.spec.mask_bits)) != 0
            mask = mask.astype(np.int32)
        if "variance" in self.planes:
            variance = read(self.planes["variance"])
        elif "ivar" in self.planes:
            ivar = read(self.planes["ivar"]).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                variance = np.where(ivar > 0, 1.0 / ivar, np.nan)
            missing = (ivar == 0) if missing is None else missing | (ivar == 0)
        return data, variance, mask, missing


class _TileError(Exception):
    """The tile itself is unusable: one rejection for it."""


def _open_tile(path: str, weight: str | None, spec: _Spec) -> _Tile:
    tiles = _WORKER.setdefault("tiles", {})
    if path not in tiles:
        tiles[path] = _Tile(path, weight, spec)
    return tiles[path]


def _cut_batch(job: _TileJob) -> list:
    spec, check = _WORKER["spec"], _WORKER["check"]
    tile = _open_tile(job.readable, job.weight, spec)
    return [_cut_row(tile, job, r, spec, check) for r in job.rows]


def _cut_row(tile: _Tile, job: _TileJob, r, spec: _Spec, check: _Validator) -> Item:
    """One catalog row cut from the tile and validated; any surprise is that row's rejection."""
    from astropy.nddata import NoOverlapError, PartialOverlapError, overlap_slices

    if isinstance(r, Rejected):
        return r
    i, oid, a, b = r
    src = job.source
    where = f"catalog row {i}"
    try:
        if (problem := _id_problem(oid)) is not None:
            return Rejected(src, oid, f"{where}: {problem}")
        if _is_known(spec, oid):
            return Known(src, oid)
        ny, nx = tile.shape[-2:]
        h, w = spec.shape
        if job.use_radec:
            ra, dec = a, b
            x, y = (float(v) for v in tile.wcs.world_to_pixel_values(ra, dec))
            if not (math.isfinite(x) and math.isfinite(y)):
                return Rejected(src, oid, f"{where}: ra, dec = ({ra}, {dec}) does not map onto the tile")
        else:
            x, y = a, b
            ra, dec = ((float(v) for v in tile.wcs.pixel_to_world_values(x, y)) if tile.wcs is not None
                       else (math.nan, math.nan))
        # far-off positions are outside before any arithmetic: 1e300 would overflow the slicing
        at = f"pixel (x, y) = ({_num(x)}, {_num(y)})"
        try:
            if not (abs(x) < 1e9 and abs(y) < 1e9):
                raise NoOverlapError  # decided before any arithmetic: 1e300 would overflow the slicing
            (sy, sx), _ = overlap_slices((ny, nx), (h, w), (y, x), mode="strict")
        except NoOverlapError:
            return Rejected(src, oid, f"{where}: {at} is outside the {nx}x{ny} tile")
        except PartialOverlapError:
            return Rejected(src, oid, f"{where}: {at} is within {max(h, w) // 2} px of "
                                      f"the tile edge; the {h}x{w} cutout does not fit")
        data, variance, mask, missing = tile.cut(sy, sx)
        return check(_Raw(oid, data, src, ra, dec, variance, mask, missing, tile.bands))
    except Exception as e:  # one row must never stop an ingest
        return Rejected(src, oid, f"{where}: unreadable: {type(e).__name__}: {_first_line(e)}")


def _num(v: float) -> str:
    return f"{v:.1f}" if abs(v) < 1e6 else f"{v:.6g}"


def _weight_beside(path: Path) -> str | None:
    """A SWarp-style weight map beside the tile: ``coadd.fits`` → ``coadd.weight.fits``."""
    stem = _stem(path)
    for suffix in (".weight.fits", ".weight.fits.fz", ".weight.fits.gz"):
        p = path.with_name(stem + suffix)
        if p.exists() and p != path:
            return str(p)
    return None


def _iter_tile(path: Path, catalog: Path, spec: _Spec, check: _Validator, workers: int, batch: int) -> Iterator[Item]:
    src, stem = str(path), _stem(path)
    has, rows = _catalog(catalog, spec.objid_key)
    weight = _weight_beside(path)
    try:
        tile = _Tile(src, weight, spec)
    except _TileError as e:
        yield Rejected(src, "", str(e))
        return
    except Exception as e:
        yield Rejected(src, "", f"unreadable FITS tile: {type(e).__name__}: {_first_line(e)}")
        return
    use_radec = {"ra", "dec"} <= has and (tile.wcs is not None or not {"x", "y"} <= has)
    if use_radec and tile.wcs is None:
        raise InputError(src, "tile has no celestial WCS, so the catalog's ra, dec cannot be placed; "
                              "give x, y pixel columns instead")

    def parsed():
        for i, rec in rows:
            if isinstance(rec, str):
                yield Rejected(src, "", rec)
                continue
            oid = str(rec.get("id", "")).strip() or f"{stem}-{i}"
            a, b = (rec["ra"], rec["dec"]) if use_radec else (rec["x"], rec["y"])
            try:
                a, b = float(a), float(b)
            except (TypeError, ValueError, OverflowError):
                yield Rejected(src, oid, f"catalog row {i}: position ({a!r}, {b!r}) is not a number")
                continue
            if not (math.isfinite(a) and math.isfinite(b)):
                yield Rejected(src, oid, f"catalog row {i}: position ({a}, {b}) is not finite")
                continue
            yield (i, oid, a, b)

    jobs = (_TileJob(src, tile.readable, weight, use_radec, rs) for rs in _batches(parsed(), batch))
    if workers > 1:
        for out in _in_processes(_cut_batch, jobs, spec, workers):
            yield from out
        return
    for job in jobs:
        for r in job.rows:
            yield _cut_row(tile, job, r, spec, check)
