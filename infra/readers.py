"""Read cutouts from survey sources and validate them: good cutouts out, bad input as `Rejected`.

Three kinds of source, all streamed one object at a time (never the whole source in memory):

- a directory of FITS cutouts, one object per file, files in name order: a (B, H, W) cube in the
  first image HDU, or one 2-D image HDU per band (a single such file is accepted too);
- a FITS tile (2-D image, or (B, H, W) cube with a celestial WCS) and a catalog (CSV or FITS
  table) with ``ra, dec`` in degrees or ``x, y`` in 0-based pixels, cut with `Cutout2D`;
- ``.npy`` of (N, B, H, W) cutouts, or ``.npz`` with ``images`` and optional ``ids``, ``ra``, ``dec``.

A source that cannot be found, or a catalog without position columns, raises `InputError`: the
command line is wrong, no single input is. Everything else that goes wrong with one input (a file
that is not FITS, truncated, of the wrong shape, mostly NaN...) becomes a `Rejected` whose reason
says what is wrong and, where it helps, what to do.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D, NoOverlapError, PartialOverlapError
from astropy.wcs import WCS

from infra.errors import InputError

__all__ = ["Cutout", "Rejected", "iter_source", "count_items"]

_ARRAY_SUFFIXES = (".npy", ".npz")
_ID_COLUMNS = ("object_id", "objid", "id")


@dataclass
class Cutout:
    """One good cutout.

    Arguments:
        object_id: the survey's id of the object.
        pixels: (B, H, W) float32, native byte order, every non-finite pixel set to NaN.
        source: the file it came from.
        ra, dec: sky position in degrees (NaN when the source does not say).
        n_missing: how many pixels are NaN.
    """

    object_id: str
    pixels: np.ndarray
    source: str
    ra: float = math.nan
    dec: float = math.nan
    n_missing: int = 0


@dataclass
class Rejected:
    """One unusable input: where it came from, its id when known (else ""), and why it was refused."""

    source: str
    object_id: str
    reason: str


@dataclass
class _Raw:
    """A cutout as read, before validation: `data` of any numeric dtype and any dims."""

    object_id: str
    data: np.ndarray
    source: str
    ra: float = math.nan
    dec: float = math.nan


def iter_source(source: str, *, bands: int | tuple[str, ...] | None, shape: tuple[int, int] | None,
                objid_key: str = "OBJID", max_missing_frac: float = 0.25, catalog: str | None = None,
                cutout_size: int | None = None) -> Iterator[Cutout | Rejected]:
    """Every object of `source`, validated, in source order: a `Cutout` or a `Rejected` each.

    Arguments:
        source: a directory of FITS cutouts, a FITS file (a tile when `catalog` is given, else one
            cutout), or a ``.npy`` / ``.npz`` file.
        bands: the band count every cutout must have, or the store's band names (then reasons name
            them); None takes the first good cutout's count and enforces it afterwards.
        shape: (H, W) every cutout must have; None takes the first good cutout's.
        objid_key: FITS header keyword holding the object id (primary header, or the first HDU
            that has it); without it the file stem is the id.
        max_missing_frac: cutouts with a larger fraction of non-finite pixels are rejected.
        catalog: CSV or FITS table of the objects on a FITS tile.
        cutout_size: H = W of the cutouts cut from a tile (default: `shape`).

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
    if path.is_dir():
        if catalog is not None:
            raise InputError(str(source), "a catalog goes with a FITS tile, not a directory of cutouts")
        raw: Iterator[_Raw | Rejected] = _iter_fits_files(_dir_files(path), objid_key)
    elif path.suffix.lower() in _ARRAY_SUFFIXES:
        raw = _iter_npy(path) if path.suffix.lower() == ".npy" else _iter_npz(path)
    elif catalog is not None:
        size = (cutout_size, cutout_size) if cutout_size else shape
        if size is None:
            raise InputError(str(source), "a FITS tile needs a cutout size (settings.cutout_size)")
        raw = _iter_tile(path, Path(catalog), tuple(size), objid_key)
    else:
        raw = _iter_fits_files([path], objid_key)
    check = _Validator(bands, shape, max_missing_frac)
    for item in raw:
        yield item if isinstance(item, Rejected) else check(item)


def count_items(source: str, catalog: str | None = None) -> int | None:
    """How many objects `source` holds (files, array rows, catalog rows), cheaply; None if unknown."""
    try:
        path = Path(source)
        if path.is_dir():
            return len(_dir_files(path))
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
            with open(catalog, newline="") as f:
                return max(0, sum(1 for line in f if line.strip()) - 1)
        with fits.open(catalog, memmap=True) as hdul:
            return int(_first_table(hdul).header["NAXIS2"])
    except Exception:  # a progress bar total is a nicety: never fail for it
        return None


# ---- validation ------------------------------------------------------------------------------
def _pct(frac: float, other: float) -> str:
    """`frac` as a percentage, with a decimal when whole percents would read as equal to `other`."""
    a, b = f"{frac:.0%}", f"{other:.0%}"
    return f"{frac:.1%}" if a == b else a


class _Validator:
    """Turns a `_Raw` into a `Cutout` or a `Rejected`; learns B and (H, W) from the first good one if not given."""

    def __init__(self, bands: int | tuple[str, ...] | None, shape: tuple[int, int] | None, max_missing_frac: float):
        if bands is None or isinstance(bands, (int, np.integer)):
            self.n_bands, self.names = (None if bands is None else int(bands)), None
        else:
            self.n_bands, self.names = len(bands), tuple(bands)
        self.shape = None if shape is None else (int(shape[0]), int(shape[1]))
        self.given = "store has" if bands is not None else "earlier cutouts have"
        self.given_shape = "store has" if shape is not None else "earlier cutouts are"
        self.max_missing_frac = max_missing_frac

    def __call__(self, raw: _Raw) -> Cutout | Rejected:
        def reject(reason: str) -> Rejected:
            return Rejected(raw.source, raw.object_id, reason)

        data = raw.data
        if data.dtype.kind not in "biuf":
            return reject(f"pixels of type {data.dtype}: expected numbers")
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            return reject(f"{data.ndim}-D image {tuple(data.shape)}: expected a (B, H, W) cube or one 2-D image per band")
        b, h, w = data.shape
        if min(b, h, w) == 0:
            return reject(f"empty image {tuple(data.shape)}")
        if self.n_bands is not None and b != self.n_bands:
            names = f" ({','.join(self.names)})" if self.names else ""
            return reject(f"{b} bands, {self.given} {self.n_bands}{names}")
        if self.shape is not None and (h, w) != self.shape:
            return reject(f"cutout {h}x{w} px, {self.given_shape} {self.shape[0]}x{self.shape[1]}; "
                          f"re-cut it to that size")
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range becomes inf: missing
            pixels = np.array(data, dtype=np.float32)  # a native-endian copy, whatever the file held
        bad = ~np.isfinite(pixels)
        n_missing = int(bad.sum())
        if n_missing == pixels.size:
            return reject("all-NaN cutout (no finite pixel)")
        frac = n_missing / pixels.size
        if frac > self.max_missing_frac:
            return reject(f"{_pct(frac, self.max_missing_frac)} missing pixels > "
                          f"{_pct(self.max_missing_frac, frac)} threshold")
        pixels[bad] = np.nan
        if self.n_bands is None:
            self.n_bands = b
        if self.shape is None:
            self.shape = (h, w)
        return Cutout(raw.object_id, pixels, raw.source, float(raw.ra), float(raw.dec), n_missing)


# ---- FITS cutouts ----------------------------------------------------------------------------
def _dir_files(path: Path) -> list[Path]:
    """Every file of a directory (hidden ones too: each is an input), by name; subdirectories skipped."""
    with os.scandir(path) as it:
        return sorted((Path(e.path) for e in it if not e.is_dir()), key=lambda p: p.name)


def _iter_fits_files(files: list[Path], objid_key: str) -> Iterator[_Raw | Rejected]:
    for f in files:
        try:
            yield _read_fits_cutout(f, objid_key)
        except Exception as e:  # last resort: one odd file must never stop an ingest
            yield Rejected(str(f), f.stem, f"unreadable: {type(e).__name__}: {_first_line(e)}")


def _first_line(e: BaseException | str) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else ""


def _is_image(hdu) -> bool:
    return hdu.is_image and int(hdu.header.get("NAXIS", 0)) > 0


def _read_fits_cutout(path: Path, objid_key: str) -> _Raw | Rejected:
    src, stem = str(path), path.stem
    size = path.stat().st_size
    if size == 0:
        return Rejected(src, stem, "empty file (0 bytes): not a FITS file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False)
        except OSError as e:
            why = "no SIMPLE card at its start" if "SIMPLE" in str(e) else _first_line(e).split(". ")[0]
            return Rejected(src, stem, f"not a FITS file ({why})")
        with hdul:
            len(hdul)  # reads every header now, so damage anywhere shows as a warning here
            damaged = [str(w.message) for w in caught if "truncated" in str(w.message) or "corrupt" in str(w.message)]
            for i, hdu in enumerate(hdul):
                info = hdul.fileinfo(i)
                end = info["datLoc"] + info["datSpan"]
                if end > size:
                    return Rejected(src, stem, f"truncated: {size} bytes, its headers say {end}; fetch the file again")
            if damaged:
                return Rejected(src, stem, f"truncated or corrupt: {_first_line(damaged[0])}; fetch the file again")
            try:
                hdul.verify("silentfix+exception")
            except fits.VerifyError as e:
                return Rejected(src, stem, f"invalid FITS: {_first_line(e)}")
            object_id = _header_id(hdul, objid_key) or stem
            images = [h for h in hdul if _is_image(h)]
            if not images:
                return Rejected(src, object_id, "no image data in any HDU")
            first = images[0]
            if first.header["NAXIS"] != 2:
                data = first.data
            else:
                planes = [h for h in images if h.header["NAXIS"] == 2]
                if len(planes) != len(images):
                    return Rejected(src, object_id, "mixes 2-D and other image HDUs: expected a (B, H, W) "
                                                    "cube or one 2-D image per band")
                shapes = {h.data.shape for h in planes}
                if len(shapes) > 1:
                    return Rejected(src, object_id, f"band images differ in shape: {sorted(shapes)}")
                data = np.stack([h.data for h in planes])
            if data is None:
                return Rejected(src, object_id, "no image data in any HDU")
            ra, dec = _header_position(first.header)
            return _Raw(object_id, np.asarray(data), src, ra, dec)


def _header_id(hdul: fits.HDUList, key: str) -> str | None:
    for hdu in hdul:
        if key in hdu.header:
            value = str(hdu.header[key]).strip()
            if value:
                return value
    return None


def _header_position(header: fits.Header) -> tuple[float, float]:
    """(ra, dec) in degrees: RA/DEC keywords, else the WCS at the cutout centre, else NaN."""
    try:
        if "RA" in header and "DEC" in header:
            return float(header["RA"]), float(header["DEC"])
        wcs = WCS(header).celestial
        if wcs.has_celestial and wcs.naxis == 2:
            ny, nx = int(header[f"NAXIS{wcs.wcs.lat + 1}"]), int(header[f"NAXIS{wcs.wcs.lng + 1}"])
            ra, dec = wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
            return float(ra), float(dec)
    except Exception:  # a position is a nicety here: a cutout without one still counts
        pass
    return math.nan, math.nan


# ---- arrays ----------------------------------------------------------------------------------
def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(f)


def _array_shape_problem(shape: tuple[int, ...]) -> str | None:
    if len(shape) == 4:
        return None
    hint = "; add a band axis: a[:, None]" if len(shape) == 3 else ""
    return f"array of shape {tuple(shape)}: expected (N, B, H, W) cutouts{hint}"


def _iter_npy(path: Path, block_bytes: int = 16 << 20) -> Iterator[_Raw | Rejected]:
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
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else 0
            need = (shape[0] if shape else 1) * row
            have = os.fstat(f.fileno()).st_size - f.tell()
            if have < need:
                raise ValueError(f"file is truncated: {have} bytes of data, the header promises {need}")
        except Exception as e:
            yield Rejected(src, "", f"unreadable .npy: {type(e).__name__}: {_first_line(e)}")
            return
        if (problem := _array_shape_problem(shape)) is not None:
            yield Rejected(src, "", problem)
            return
        if fortran:
            images = np.load(path, mmap_mode="r", allow_pickle=False)
            for i in range(len(images)):
                yield _Raw(f"{stem}-{i}", np.asarray(images[i]), src)
            return
        per_block = max(1, block_bytes // max(row, 1))
        for start in range(0, shape[0], per_block):
            k = min(per_block, shape[0] - start)
            block = np.fromfile(f, dtype=dtype, count=k * (row // dtype.itemsize)).reshape((k,) + tuple(shape[1:]))
            for j in range(k):
                yield _Raw(f"{stem}-{start + j}", block[j], src)


def _iter_npz(path: Path) -> Iterator[_Raw | Rejected]:
    src, stem = str(path), path.stem
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if "images" not in keys:
                yield Rejected(src, "", f"no 'images' array in .npz (has: {', '.join(keys) or 'nothing'})")
                return
            extra = {k: np.asarray(z[k]) for k in ("ids", "ra", "dec") if k in keys}  # 1-D: small
        with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
            shape, fortran, dtype = _npy_header(f)
            if (problem := _array_shape_problem(shape)) is not None:
                yield Rejected(src, "", problem)
                return
            for k, v in extra.items():
                if len(v) != shape[0]:
                    yield Rejected(src, "", f"'{k}' has {len(v)} entries, 'images' {shape[0]}: they must align")
                    return
            if dtype.hasobject:
                yield Rejected(src, "", f"'images' of type {dtype}: expected numbers")
                return
            ids = extra.get("ids")
            rows = _npz_rows(path, f, shape, fortran, dtype)
            for i, data in enumerate(rows):
                oid = str(ids[i]) if ids is not None else f"{stem}-{i}"
                yield _Raw(oid, data, src, extra["ra"][i] if "ra" in extra else math.nan,
                           extra["dec"][i] if "dec" in extra else math.nan)
    except Exception as e:
        yield Rejected(src, "", f"unreadable .npz: {type(e).__name__}: {_first_line(e)}")


def _npz_rows(path: Path, f, shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Rows of the ``images`` member read one at a time off the zip stream (no mmap for .npz)."""
    if fortran:  # rows are not contiguous: the one layout that needs the whole array
        with np.load(path, allow_pickle=False) as z:
            yield from z["images"]
        return
    row_shape = tuple(shape[1:])
    nbytes = int(np.prod(row_shape)) * dtype.itemsize
    for _ in range(shape[0]):
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError(f"'images' ends early: truncated .npz")
        yield np.frombuffer(buf, dtype=dtype).reshape(row_shape)


# ---- FITS tile + catalog ---------------------------------------------------------------------
def _is_csv(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".txt")


def _first_table(hdul: fits.HDUList):
    for hdu in hdul:
        if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)) and not isinstance(hdu, fits.CompImageHDU):
            return hdu
    raise InputError(hdul.filename() or "catalog", "no table HDU in the FITS catalog")


def _catalog(path: Path, objid_key: str) -> tuple[set[str], Iterator[tuple[int, dict]]]:
    """(the keys it has among id, ra, dec, x, y; its rows as (index, {key: value})), rows streamed."""
    if _is_csv(path):
        f = open(path, newline="")
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        at = {h.lower(): i for i, h in enumerate(header)}

        def records():
            with f:
                for i, r in enumerate(reader):
                    if any(s.strip() for s in r):
                        yield i, lambda c: r[at[c]].strip() if at[c] < len(r) else ""
    else:
        hdul = fits.open(path, memmap=True)
        table = _first_table(hdul)
        header = list(table.columns.names)
        at = {h.lower(): h for h in header}

        def records():
            with hdul:
                for i, r in enumerate(table.data):
                    yield i, lambda c: r[at[c]]
    keys = {k: k for k in ("ra", "dec", "x", "y") if k in at}
    id_col = next((c for c in (*_ID_COLUMNS, objid_key.lower()) if c in at), None)
    if id_col:
        keys["id"] = id_col
    if not ({"ra", "dec"} <= set(keys) or {"x", "y"} <= set(keys)):
        raise InputError(str(path), f"catalog needs columns ra, dec (degrees) or x, y (0-based pixels); "
                                    f"it has {', '.join(header) or 'none'}")

    def rows():
        for i, get in records():
            yield i, {k: get(c) for k, c in keys.items()}

    return set(keys), rows()


def _iter_tile(path: Path, catalog: Path, size: tuple[int, int], objid_key: str) -> Iterator[_Raw | Rejected]:
    src, stem = str(path), path.stem
    has, rows = _catalog(catalog, objid_key)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(path, memmap=True)  # Cutout2D slices views: only the cut pixels are read
            images = [h for h in hdul if _is_image(h)]
            hdu = images[0] if images else None
            wcs = WCS(hdu.header).celestial if hdu is not None else None
            data = hdu.data if hdu is not None else None
    except Exception as e:
        yield Rejected(src, "", f"unreadable FITS tile: {type(e).__name__}: {_first_line(e)}")
        return
    with hdul:
        if data is None or data.ndim not in (2, 3):
            what = "no image data" if data is None else f"{data.ndim}-D image"
            yield Rejected(src, "", f"{what}: a tile is a 2-D image or a (B, H, W) cube")
            return
        if not wcs.has_celestial:
            wcs = None
        use_radec = {"ra", "dec"} <= has and (wcs is not None or not {"x", "y"} <= has)
        if use_radec and wcs is None:
            raise InputError(src, "tile has no celestial WCS, so the catalog's ra, dec cannot be placed; "
                                  "give x, y pixel columns instead")
        plane = data if data.ndim == 2 else data[0]
        ny, nx = plane.shape
        for i, rec in rows:
            oid = str(rec.get("id", "")).strip() or f"{stem}-{i}"
            where = f"catalog row {i}"
            a, b = (rec["ra"], rec["dec"]) if use_radec else (rec["x"], rec["y"])
            try:
                a, b = float(a), float(b)
            except (TypeError, ValueError):
                yield Rejected(src, oid, f"{where}: position ({a!r}, {b!r}) is not a number")
                continue
            if not (math.isfinite(a) and math.isfinite(b)):
                yield Rejected(src, oid, f"{where}: position ({a}, {b}) is not finite")
                continue
            if use_radec:
                ra, dec = a, b
                x, y = (float(v) for v in wcs.world_to_pixel_values(ra, dec))
            else:
                x, y = a, b
                ra, dec = ((float(v) for v in wcs.pixel_to_world_values(x, y)) if wcs is not None
                           else (math.nan, math.nan))
            if not (math.isfinite(x) and math.isfinite(y)):
                yield Rejected(src, oid, f"{where}: ra, dec = ({ra}, {dec}) does not map onto the tile")
                continue
            try:
                cut = Cutout2D(plane, position=(x, y), size=size, mode="strict", copy=False)
            except NoOverlapError:
                yield Rejected(src, oid, f"{where}: pixel (x, y) = ({x:.1f}, {y:.1f}) is outside the "
                                         f"{nx}x{ny} tile")
                continue
            except PartialOverlapError:
                yield Rejected(src, oid, f"{where}: pixel (x, y) = ({x:.1f}, {y:.1f}) is within "
                                         f"{max(size) // 2} px of the tile edge; the {size[0]}x{size[1]} "
                                         f"cutout does not fit")
                continue
            sy, sx = cut.slices_original
            pixels = plane[sy, sx] if data.ndim == 2 else data[:, sy, sx]
            yield _Raw(oid, np.asarray(pixels), src, ra, dec)
