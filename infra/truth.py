"""Simulated surveys on disk: one FITS cube per object, and the truth sidecar table beside the directory.

The truth (labels, anomaly classes, per-pixel footprints) is kept *beside* the cutout directory,
never in it, so ingest sees exactly what a survey would give it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
from astropy.io import fits
from astropy.table import Table

from infra.store import SurveyStore

__all__ = ["truth_path_for", "write_fits_cutouts", "write_truth", "read_truth", "attach_truth"]

log = logging.getLogger("gsafe.truth")


def truth_path_for(fits_dir: str | Path) -> Path:
    """`DIR` -> `DIR_truth.fits` beside it."""
    d = Path(fits_dir).resolve()
    return d.parent / f"{d.name}_truth.fits"


def write_fits_cutouts(fits_dir: str | Path, images: np.ndarray, object_ids, ra, dec, bands, pixel_scale: float,
                       objid_key: str = "OBJID") -> None:
    """One FITS file per object: a (B, H, W) float32 cube with OBJID, RA, DEC and BANDS in the header."""
    d = Path(fits_dir)
    d.mkdir(parents=True, exist_ok=True)
    for img, oid, r, de in zip(images, object_ids, ra, dec):
        hdr = fits.Header()
        hdr[objid_key] = str(oid)
        hdr["RA"] = (float(r), "deg")
        hdr["DEC"] = (float(de), "deg")
        hdr["BANDS"] = ",".join(bands)
        hdr["PIXSCALE"] = (float(pixel_scale), "arcsec/pixel")
        tmp = d / f".{oid}.fits.tmp"
        fits.PrimaryHDU(np.asarray(img, np.float32), header=hdr).writeto(tmp, overwrite=True)
        tmp.rename(d / f"{oid}.fits")


def write_truth(path: str | Path, columns: Mapping[str, np.ndarray]) -> None:
    """Write the truth table: object_id, label, anomaly_class, ra, dec, footprint (H, W)."""
    t = Table({k: np.asarray(v) for k, v in columns.items()})
    path = Path(path)
    tmp = path.with_suffix(".tmp.fits")
    t.write(tmp, overwrite=True)
    tmp.rename(path)


def read_truth(path: str | Path) -> dict[str, np.ndarray]:
    t = Table.read(path)
    return {k: np.asarray(t[k]) for k in t.colnames}


def attach_truth(store: SurveyStore, truth: Mapping[str, np.ndarray]) -> int:
    """Merge labels, classes and footprints of a truth table onto the store rows with the same object id.

    A merge: rows the table does not name keep what they had (labels joined by an earlier table,
    or -1 and an empty class when never labelled), so truth can be joined source by source.
    Holds the store's lock, so rows appended meanwhile by another writer are neither lost nor
    mislabelled. Returns how many rows matched.
    """
    t_ids = np.asarray(truth["object_id"]).astype(str)
    pos = {o: i for i, o in enumerate(t_ids)}
    with store.lock():
        ids = store.object_ids().astype(str)
        idx = np.array([pos.get(o, -1) for o in ids], dtype=np.int64)
        hit = idx >= 0
        have = set(store.columns)
        label = store.read_catalog(["label"])["label"].astype(np.int8) if "label" in have \
            else np.full(len(ids), -1, np.int8)
        label[hit] = np.asarray(truth["label"])[idx[hit]]
        cls = store.read_catalog(["anomaly_class"])["anomaly_class"].astype(object) if "anomaly_class" in have \
            else np.full(len(ids), "", dtype=object)
        cls[hit] = np.asarray(truth["anomaly_class"]).astype(str)[idx[hit]]
        store.set_column("label", label)
        store.set_column("anomaly_class", cls)
        if "footprint" in truth:
            fp_t = np.asarray(truth["footprint"], np.uint8)
            fp = store.read_aux("footprint").astype(np.uint8) if "footprint" in store.aux_names \
                else np.zeros((len(ids), *fp_t.shape[1:]), np.uint8)
            fp[hit] = fp_t[idx[hit]]
            store.set_column("footprint", fp, parent="aux")
    return int(hit.sum())
