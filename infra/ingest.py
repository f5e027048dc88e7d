"""Ingest: validated cutouts from a source into the survey store, bad input into its quarantine.

Idempotent: an object id already in the store (or seen earlier in the same run) is skipped, and a
rejection already in the quarantine is not recorded again, so re-running an ingest adds nothing.
Memory is one store chunk of cutouts: they are appended a chunk at a time, aligned to the store's
chunks so every write after the first covers whole chunks.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from infra.errors import InputError, SchemaVersionError, StoreError
from infra.readers import Cutout, Rejected, count_items, iter_source
from infra.settings import Settings
from infra.store import SurveyStore, id_hash

__all__ = ["IngestSummary", "ingest"]

log = logging.getLogger("gsafe.ingest")


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
    try:
        return SurveyStore.open(url, mode="r+")
    except StoreError as e:
        # only a store that is not there at all may be made; anything else there stays untouched
        if create and not isinstance(e, SchemaVersionError) and isinstance(e.__cause__, FileNotFoundError):
            return None
        raise


def _where(item: Cutout | Rejected) -> str:
    """`source`, with the object id when the source's name does not already say it."""
    if item.object_id and item.object_id != Path(item.source).stem:
        return f"{item.source} ({item.object_id})"
    return item.source


class _Writer:
    """Buffers good cutouts and rejections, and writes them to the store a chunk at a time."""

    def __init__(self, store: SurveyStore, extra_columns: Callable[[list[Cutout]], dict] | None):
        self.store, self.extra_columns = store, extra_columns
        self.summary = IngestSummary()
        self.buffer: list[Cutout] = []
        self.pending_quarantine: list[tuple[str, str, str]] = []
        self.existing = store.existing_hashes()
        q = store.read_quarantine()
        self.quarantined = set(zip(q["source"], q["object_id"], q["reason"]))
        self.seen: set[int] = set()  # id hashes of this run: 8 bytes per object, not the id itself

    def add(self, item: Cutout | Rejected) -> None:
        if isinstance(item, Rejected):
            self._reject(item)
            return
        h = int(id_hash([item.object_id])[0])
        i = int(np.searchsorted(self.existing, np.uint64(h)))
        if i < len(self.existing) and int(self.existing[i]) == h:
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
        key = (item.source, item.object_id, item.reason)
        if key in self.quarantined:
            self.summary.already_quarantined += 1
            log.debug("ingest: %s: %s: already quarantined", _where(item), item.reason)
            return
        self.quarantined.add(key)
        self.pending_quarantine.append(key)
        log.warning("ingest: %s: %s: quarantined", _where(item), item.reason)

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            catalog = {
                "object_id": np.array([c.object_id for c in batch], dtype=object),
                "ra": np.array([c.ra for c in batch], np.float64),
                "dec": np.array([c.dec for c in batch], np.float64),
                "source": np.array([c.source for c in batch], dtype=object),
                "n_missing": np.array([c.n_missing for c in batch], np.int32),
            }
            if self.extra_columns is not None:
                catalog.update(self.extra_columns(batch))
            self.store.append(np.stack([c.pixels for c in batch]), catalog)
            self.summary.ingested += len(batch)
        if self.pending_quarantine:
            self.store.add_quarantine(self.pending_quarantine)
            self.pending_quarantine = []


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
        settings: chunk size, bands, cutout size (for tiles), objid keyword, NaN threshold.
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
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gsafe": _gsafe_version()}
    store = _open_store(store_url, create)
    created = store is None
    if created:
        store = _create_from_first_cutout(source, store_url, settings, catalog, record)
    items = iter_source(source, bands=store.bands, shape=store.image_shape[1:], objid_key=settings.objid_key,
                        max_missing_frac=settings.max_missing_frac, catalog=catalog)
    writer = _Writer(store, extra_columns)
    with tqdm(total=count_items(source, catalog), disable=not progress, unit="cutout", desc="ingest") as bar:
        for item in items:
            writer.add(item)
            bar.update()
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
                  cutout_size=settings.cutout_size)
    configured = dict(bands=len(settings.bands), shape=(settings.cutout_size, settings.cutout_size))
    rejected: list[Rejected] = []
    for attempt in (configured, dict(bands=None, shape=None)):
        for i, item in enumerate(iter_source(source, **attempt, **common)):
            if isinstance(item, Cutout):
                b, h, w = item.pixels.shape
                names = tuple(settings.bands) if len(settings.bands) == b else tuple(f"b{i}" for i in range(b))
                if attempt is not configured:
                    log.warning("ingest: no cutout of the configured shape (%d bands, %d×%d) among the first %d "
                                "inputs; shaping the store like %s; set GSAFE_BANDS / GSAFE_CUTOUT_SIZE to choose",
                                len(settings.bands), settings.cutout_size, settings.cutout_size, probe, item.source)
                log.info("ingest: creating store %s: %d bands (%s), %dx%d px", url, b, ",".join(names), h, w)
                return SurveyStore.create(url, bands=names, height=h, width=w, chunk_size=settings.chunk_size,
                                          pixel_scale=settings.pixel_scale, provenance=record)
            if attempt is not configured:
                rejected.append(item)
            elif i >= probe:
                break
    for item in rejected:
        log.warning("ingest: %s: %s: not ingested", _where(item), item.reason)
    what = f"no usable cutout ({len(rejected)} rejected, reasons above)" if rejected else "no inputs"
    raise InputError(str(source), f"{what}; no store created at {url}")
