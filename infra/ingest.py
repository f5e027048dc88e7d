"""Ingest: validated cutouts from a source into the survey store, bad input into its quarantine.

Idempotent: an object id already in the store (or seen earlier in the same run) is skipped, and a
rejection already in the quarantine is not recorded again, so re-running an ingest adds nothing.
Memory is one store chunk of cutouts: they are appended a chunk at a time, aligned to the store's
chunks so every write after the first covers whole chunks. Inputs are read by worker processes
(`Settings.ingest_workers`; by default one per core but one, on 3 cores or more, for sources of
`PARALLEL_FROM` inputs or more), one batch in flight per worker, and appended in source order.

Beside ``images`` the store gets, when a source gives them, ``aux/variance`` (N, B, H, W) float32
(pixel variance in image units squared; NaN where unknown or missing: training and scoring pass it
to the noise model, see :class:`gsafe_models.noise.ResidualNoise`) and ``aux/mask`` (N, B, H, W)
int32 (the source's bit mask as given; -1 where none came). Pixels with a masked bit of
`Settings.mask_bits`, or of zero inverse variance, are NaN in ``images``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from infra.errors import InputError, SchemaVersionError, StoreError
from infra.locks import lock_url_for, store_lock
from infra.readers import Cutout, Known, Rejected, count_items, iter_source, storable
from infra.settings import Settings
from infra.store import SurveyStore, id_hash

__all__ = ["IngestSummary", "ingest", "PARALLEL_FROM"]

log = logging.getLogger("gsafe.ingest")

PARALLEL_FROM = 256  # inputs below which reading stays in this process (starting workers costs ~1 s each)
_QUARANTINE_BATCH = 1024  # rejections held before they are written: memory stays flat whatever fails
_READ_BATCH = 128  # inputs per unit of work of a reader process


@dataclass
class IngestSummary:
    """What one ingest did, in counts of inputs (each input is counted once, in one of the three).

    Arguments:
        ingested: cutouts appended to the store.
        quarantined: inputs rejected (file unreadable, wrong shape, too many NaN...).
        skipped: cutouts whose object id the store already held, or that came twice in this run.
        already_quarantined: of `quarantined`, how many were in the quarantine from an earlier run
            (not recorded again).
    """

    ingested: int = 0
    quarantined: int = 0
    skipped: int = 0
    already_quarantined: int = 0

    @property
    def total(self) -> int:
        return self.ingested + self.quarantined + self.skipped

    def line(self) -> str:
        """One line for the user, e.g. ``ingest: 1990 ingested, 10 quarantined, 0 skipped as already there``."""
        again = f" ({self.already_quarantined} of them already recorded)" if self.already_quarantined else ""
        return (f"ingest: {self.ingested} ingested, {self.quarantined} quarantined{again}, "
                f"{self.skipped} skipped as already there")


def _gsafe_version() -> str:
    try:
        return importlib.metadata.version("gsafe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _open_store(url: str, create: bool) -> SurveyStore | None:
    """The store at `url` opened to append, or None when it is missing and `create` allows making it."""
    for attempt in range(2):
        try:
            return SurveyStore.open(url, mode="r+")
        except SchemaVersionError:
            raise
        except StoreError as e:
            # only a store that is not there at all may be made; anything else there stays untouched
            if create and isinstance(e.__cause__, FileNotFoundError):
                return None
            if attempt:
                raise
            # half there: another ingest may be creating it, under the store's lock until done
            with store_lock(url):
                pass


def _where(item: Cutout | Rejected | Known) -> str:
    """`source`, with the object id when the source's name does not already say it."""
    if item.object_id and item.object_id != Path(item.source).stem:
        return f"{item.source} ({item.object_id})"
    return item.source


def _key_hash(row: tuple[str, str, str]) -> int:
    """64-bit hash of a quarantine row (source, object_id, reason): 8 bytes to remember it by."""
    return int.from_bytes(hashlib.blake2b("\x00".join(row).encode(), digest_size=8).digest(), "little")


def _quarantine_hashes(store: SurveyStore, block: int = 65536) -> np.ndarray:
    """Sorted hashes of every quarantine row already in the store, read a block at a time."""
    q = store.group["quarantine"]
    n = min(q[k].shape[0] for k in ("source", "object_id", "reason"))
    out = np.empty(n, np.uint64)
    for s in range(0, n, block):
        cols = [np.asarray(q[k][s:s + block], dtype=object) for k in ("source", "object_id", "reason")]
        out[s:s + len(cols[0])] = [_key_hash(tuple(map(str, r))) for r in zip(*cols)]
    return np.sort(out)


class _Hashes:
    """A set of 64-bit hashes at ~8 bytes each: a sorted array, and a small Python set (~70 bytes an
    entry) merged into it every `merge_at` additions, so remembering 10^8 ids costs ~0.8 GB, not 7."""

    def __init__(self, sorted_hashes: np.ndarray | None = None, merge_at: int = 1 << 20):
        self.sorted = np.empty(0, np.uint64) if sorted_hashes is None else np.asarray(sorted_hashes, np.uint64)
        self.new: set[int] = set()
        self.merge_at = merge_at

    def __contains__(self, h: int) -> bool:
        if h in self.new:
            return True
        i = int(np.searchsorted(self.sorted, np.uint64(h)))
        return i < len(self.sorted) and int(self.sorted[i]) == h

    def add(self, h: int) -> None:
        self.new.add(h)
        if len(self.new) >= self.merge_at:
            self.sorted = np.union1d(self.sorted, np.fromiter(self.new, np.uint64, len(self.new)))
            self.new = set()


class _Writer:
    """Buffers good cutouts and rejections, and writes them to the store a chunk at a time."""

    def __init__(self, store: SurveyStore, extra_columns: Callable[[list[Cutout]], dict] | None):
        self.store, self.extra_columns = store, extra_columns
        self.summary = IngestSummary()
        self.buffer: list[Cutout] = []
        self.pending_quarantine: list[tuple[str, str, str]] = []
        self.existing = store.existing_hashes()
        self.quarantined = _Hashes(_quarantine_hashes(store))  # rows recorded, before and during this run
        self.seen = _Hashes()  # id hashes of this run: ~8 bytes per object, not the id itself

    def add(self, item: Cutout | Rejected | Known) -> None:
        if isinstance(item, Rejected):
            self._reject(item)
            return
        if isinstance(item, Known):
            self.summary.skipped += 1
            log.debug("ingest: %s: object %s already in %s: skipped", item.source, item.object_id, self.store.url)
            return
        h = int(id_hash([item.object_id])[0])
        i = int(np.searchsorted(self.existing, np.uint64(h)))
        if i < len(self.existing) and int(self.existing[i]) == h:  # the store had it (`known` not given)
            self.summary.skipped += 1
            log.debug("ingest: %s: object %s already in %s: skipped", item.source, item.object_id, self.store.url)
            return
        if h in self.seen:
            self.summary.skipped += 1
            log.warning("ingest: %s: object id %s came earlier in this source: skipped", item.source, item.object_id)
            return
        self.seen.add(h)
        self.buffer.append(item)
        if len(self.buffer) >= self.store.chunk_size - self.store.n % self.store.chunk_size:
            self.flush()  # the first flush fills the store's last chunk: later ones write whole chunks

    def _reject(self, item: Rejected) -> None:
        self.summary.quarantined += 1
        key = (storable(item.source), storable(item.object_id), storable(item.reason))
        h = _key_hash(key)
        if h in self.quarantined:
            self.summary.already_quarantined += 1
            log.debug("ingest: %s: %s: already quarantined", _where(item), item.reason)
            return
        self.quarantined.add(h)
        self.pending_quarantine.append(key)
        log.warning("ingest: %s: %s: quarantined", storable(_where(item)), key[2])
        if len(self.pending_quarantine) >= _QUARANTINE_BATCH:
            self.store.add_quarantine(self.pending_quarantine)
            self.pending_quarantine = []

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            catalog = {
                "object_id": np.array([c.object_id for c in batch], dtype=object),
                "ra": np.array([c.ra for c in batch], np.float64),
                "dec": np.array([c.dec for c in batch], np.float64),
                "source": np.array([storable(c.source) for c in batch], dtype=object),
                "n_missing": np.array([c.n_missing for c in batch], np.int32),
            }
            if self.extra_columns is not None:
                catalog.update(self.extra_columns(batch))
            # another ingest may have committed some of these ids since this one read the store's
            # ids: the store drops them under its lock, and they count as already there
            start, stop = self.store.append(np.stack([c.pixels for c in batch]), catalog, aux=_aux(batch),
                                            dedupe_concurrent=True)
            self.summary.ingested += stop - start
            self.summary.skipped += len(batch) - (stop - start)
        if self.pending_quarantine:
            self.store.add_quarantine(self.pending_quarantine)
            self.pending_quarantine = []


def _aux(batch: list[Cutout]) -> dict[str, np.ndarray] | None:
    """``variance`` and ``mask`` of a batch, (n, B, H, W) each, when any of its cutouts has one
    (NaN variance / -1 mask for those without); None when none has."""
    out = {}
    shape = batch[0].pixels.shape
    if any(c.variance is not None for c in batch):
        out["variance"] = np.stack([np.full(shape, np.nan, np.float32) if c.variance is None else c.variance
                                    for c in batch]).astype(np.float32, copy=False)
    if any(c.mask is not None for c in batch):
        out["mask"] = np.stack([np.full(shape, -1, np.int32) if c.mask is None else c.mask
                                for c in batch]).astype(np.int32, copy=False)
    return out or None


def _workers(settings: Settings, n: int | None) -> int:
    """Reader processes for a source of `n` inputs: the setting, else one per core but the one this
    process needs to write the store, for sources of `PARALLEL_FROM` inputs or more; 1 (read here)
    otherwise. Each reader process costs ~1 s of imports to start; on 2 cores two readers and the
    writer read slower than one process doing both (see BENCHMARKS.md, "Ingest")."""
    if settings.ingest_workers is not None:
        return settings.ingest_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1) if (n or 0) >= PARALLEL_FROM and cores >= 3 else 1


def _not_inputs(store_url: str) -> tuple[str, ...]:
    """The store and its lock file (beside it): never inputs, even when they sit in the source directory."""
    if "://" in str(store_url) and not str(store_url).startswith("file://"):
        return ()
    path = str(store_url)[len("file://"):] if str(store_url).startswith("file://") else str(store_url)
    return (path, lock_url_for(store_url))


def ingest(source: str, store_url: str, *, settings: Settings, catalog: str | None = None,
           progress: bool = True, create: bool = True,
           extra_columns: Callable[[list[Cutout]], dict] | None = None) -> IngestSummary:
    """Validate every object of `source` and append the good ones to the store at `store_url`.

    Bad inputs become quarantine rows (and a warning on the ``gsafe.ingest`` logger); object ids
    already in the store are skipped, so running the same ingest twice adds nothing.

    Arguments:
        source: a directory of FITS cutouts, a FITS tile (with `catalog`), or a .npy/.npz file;
            see `infra.readers.iter_source`.
        store_url: the survey store; a missing one is created (if `create`) with B, H, W of the
            first good cutout, band names from `settings.bands` when the count matches (else
            b0, b1, ...), and `settings.chunk_size` and `settings.pixel_scale`.
        settings: chunk size, bands, cutout size (for tiles), objid keyword, NaN threshold, mask
            bits, reader processes (`ingest_workers`).
        catalog: the tile's catalog, CSV or FITS table.
        progress: show a progress bar.
        create: make the store if it is missing; otherwise a missing store raises `StoreError`.
        extra_columns: called on each batch of cutouts, returns more catalog columns
            ({name: (n,) array}), e.g. the simulator's labels.

    Raises:
        StoreError: the store is missing (and not `create`), or of another schema version.
        InputError: the source or catalog cannot be used at all, or no store exists and no
            cutout of the source is good enough to shape one.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> np.save(d / "c.npy", np.ones((3, 2, 8, 8), np.float32))
        >>> ingest(str(d / "c.npy"), str(d / "s.zarr"), settings=Settings(home=d), progress=False).line()
        'ingest: 3 ingested, 0 quarantined, 0 skipped as already there'
    """
    record = {"step": "ingest", "source": str(source), "catalog": None if catalog is None else str(catalog),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gsafe": _gsafe_version(),
              "mask_bits": list(settings.mask_bits)}  # which planes of aux/mask became NaN pixels
    store = _open_store(store_url, create)
    created = False
    if store is None:
        store = _create_from_first_cutout(source, store_url, settings, catalog, record)
        # another ingest may have created it first: then this one appends to that store
        created = record in list(store.group.attrs.get("provenance", []))
    writer = _Writer(store, extra_columns)
    exclude = _not_inputs(store_url)
    n = count_items(source, catalog, exclude)
    items = iter_source(source, bands=store.bands, shape=store.image_shape[1:], objid_key=settings.objid_key,
                        max_missing_frac=settings.max_missing_frac, catalog=catalog, mask_bits=settings.mask_bits,
                        known=writer.existing, workers=_workers(settings, n),
                        batch=min(settings.chunk_size, _READ_BATCH), exclude=exclude)
    with tqdm(total=n, disable=not progress, unit="cutout", desc="ingest") as bar:
        for item in items:
            writer.add(item)
            bar.update(item.inputs)
    writer.flush()
    summary = writer.summary
    if summary.ingested and not created:
        store.add_provenance({**record, "ingested": summary.ingested})
    log.info("%s", summary.line())
    return summary


def _create_from_first_cutout(source: str, url: str, settings: Settings, catalog: str | None,
                              record: dict, probe: int = 1000) -> SurveyStore:
    """A new store shaped like the survey: the configured bands and cutout size (settings) when the
    source has such cutouts among its first `probe` inputs, else the first good cutout's shape.

    Preferring the configured shape keeps one odd file that sorts first (a 3-band cube, a 32×32
    stamp) from shaping the store and getting every real cutout quarantined. Reading up to it
    twice (here, then in the main pass against the store) phrases every rejection reason against
    the store, so a re-run finds the same reasons already in quarantine.
    """
    common = dict(objid_key=settings.objid_key, max_missing_frac=settings.max_missing_frac, catalog=catalog,
                  cutout_size=settings.cutout_size, mask_bits=settings.mask_bits, exclude=_not_inputs(url))
    configured = dict(bands=len(settings.bands), shape=(settings.cutout_size, settings.cutout_size))
    rejected: list[Rejected] = []  # the first few, for the error; `n_rejected` counts them all
    n_rejected = 0
    for attempt in (configured, dict(bands=None, shape=None)):
        for i, item in enumerate(iter_source(source, **attempt, **common)):
            if isinstance(item, Cutout):
                b, h, w = item.pixels.shape
                names = (item.bands if item.bands is not None and len(set(item.bands)) == b
                         else tuple(settings.bands) if len(settings.bands) == b else tuple(f"b{i}" for i in range(b)))
                if attempt is not configured:
                    log.warning("ingest: no cutout of the configured shape (%d bands, %d×%d) among the first %d "
                                "inputs; shaping the store like %s; set GSAFE_BANDS / GSAFE_CUTOUT_SIZE to choose",
                                len(settings.bands), settings.cutout_size, settings.cutout_size, probe, item.source)
                log.info("ingest: creating store %s: %d bands (%s), %dx%d px", url, b, ",".join(names), h, w)
                return SurveyStore.create(url, bands=names, height=h, width=w, chunk_size=settings.chunk_size,
                                          pixel_scale=settings.pixel_scale, provenance=record, exist_ok=True)
            if attempt is not configured:
                n_rejected += 1
                if len(rejected) < 20:
                    rejected.append(item)
            elif i >= probe:
                break
    for item in rejected:
        log.warning("ingest: %s: %s: not ingested", storable(_where(item)), storable(item.reason))
    more = f", the first {len(rejected)} above" if n_rejected > len(rejected) else ", reasons above"
    what = f"no usable cutout ({n_rejected} rejected{more})" if n_rejected else "no inputs"
    raise InputError(str(source), f"{what}; no store created at {url}")
