"""A scientist's labels, kept in the survey store's append-only ``labels`` table.

One row per labelling act, never rewritten: the latest row of an object wins when read, so a
changed mind is one more row, and the history stays. Columns (1-D, one entry per row)::

    object_id   str    the catalog id
    label       str    interesting | not_interesting | artefact
    tag         str    free text, e.g. "satellite trail" ("" if none)
    relevance   float  Astronomaly's 0-5 score, NaN if not given
    who         str    the person
    when        str    ISO 8601 UTC time of the act
    model       str    NAME/version of the detector the candidate was shown by
    scope       str    "object", or "group": labelled as a member of a group the scientist suppressed
    via         str    for scope "group": the representative whose label suppressed it; else ""

Writes go through `SurveyStore.append_table`, which holds the store's cross-process lock and
commits rows atomically: two browser tabs, two review apps and a running hunt can write at once
without losing a label.
"""

from __future__ import annotations

import getpass
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from infra.errors import StoreError
from infra.safe_output import write_table
from infra.store import SurveyStore

__all__ = ["TABLE", "LABELS", "COLUMNS", "make_rows", "append_labels", "read_labels", "latest_labels",
           "export_labels", "labels_digest", "default_who"]

TABLE = "labels"
LABELS: tuple[str, ...] = ("interesting", "not_interesting", "artefact")   # = gsafe_models.relevance.LABELS
COLUMNS: tuple[str, ...] = ("object_id", "label", "tag", "relevance", "who", "when", "model", "scope", "via")
MAX_TAG = 200


def default_who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):   # no passwd entry (containers)
        return "unknown"


def make_rows(object_ids: list[str], label: str, *, model: str, tag: str = "", relevance: float | None = None,
              who: str | None = None, scope: str = "object", via: str = "", when: str | None = None) -> dict[str, np.ndarray]:
    """Label columns for one act on `object_ids`, validated; raises ValueError saying what is wrong.

    Arguments:
        object_ids: the objects labelled (one row each).
        label: interesting, not_interesting or artefact.
        model: NAME/version of the detector that showed them.
        tag: optional free text (at most 200 characters).
        relevance: Astronomaly's 0-5 relevance, or None.
        who: the person (default: the login name).
        scope: "object" or "group" (members of a suppressed group; give `via`).
        via: the representative whose label suppressed the group.
        when: ISO time (default now, UTC).
    """
    if label not in LABELS:
        raise ValueError(f"labels: {label!r} is not a label; use one of {', '.join(LABELS)}")
    if scope not in ("object", "group"):
        raise ValueError(f"labels: scope {scope!r} must be 'object' or 'group'")
    if relevance is not None:
        relevance = float(relevance)
        if not (0.0 <= relevance <= 5.0):
            raise ValueError(f"labels: relevance {relevance} is outside 0-5 (Astronomaly's scale)")
    tag = str(tag or "").strip()
    if len(tag) > MAX_TAG:
        raise ValueError(f"labels: tag of {len(tag)} characters; keep it under {MAX_TAG}")
    ids = [str(o) for o in object_ids]
    if not ids or any(not o for o in ids):
        raise ValueError("labels: every label needs a non-empty object id")
    m = len(ids)
    when = when or datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    one = lambda v: np.asarray([v] * m, dtype=object)  # noqa: E731
    return {"object_id": np.asarray(ids, dtype=object), "label": one(label), "tag": one(tag),
            "relevance": np.full(m, np.nan if relevance is None else relevance, np.float64),
            "who": one(str(who or default_who())), "when": one(when), "model": one(str(model)),
            "scope": one(scope), "via": one(str(via))}


def append_labels(store: SurveyStore, rows: dict[str, np.ndarray], known_ids: set[str] | None = None) -> tuple[int, int]:
    """Append label rows (from `make_rows`) to the store's labels table; returns their (start, stop).

    Only objects of the store may be labelled: an unknown id is refused before anything is written.
    `known_ids` (e.g. the review's candidates) spares reading the store's whole id column.
    """
    ids = set(map(str, rows["object_id"]))
    known = known_ids if known_ids is not None else set(map(str, store.object_ids()))
    unknown = sorted(ids - known)
    if unknown:
        raise StoreError(f"labels: {len(unknown)} object ids are not in store {store.url} (e.g. {unknown[:3]}); "
                         f"nothing was written")
    return store.append_table(TABLE, {k: rows[k] for k in COLUMNS})


def read_labels(store: SurveyStore) -> pd.DataFrame:
    """Every label row ever written, in writing order (empty frame with the columns if none)."""
    t = store.read_table(TABLE)
    if not t:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "relevance" else object) for c in COLUMNS})
    n = len(next(iter(t.values())))
    cols = {c: t.get(c, np.full(n, np.nan) if c == "relevance" else np.full(n, "", dtype=object)) for c in COLUMNS}
    df = pd.DataFrame(cols)
    df["relevance"] = df["relevance"].astype(float)
    for c in COLUMNS:
        if c != "relevance":
            df[c] = df[c].astype(str)
    return df


def latest_labels(store_or_frame: SurveyStore | pd.DataFrame) -> pd.DataFrame:
    """The latest label of each labelled object (the last row written wins), one row per object."""
    df = read_labels(store_or_frame) if isinstance(store_or_frame, SurveyStore) else store_or_frame
    return df.drop_duplicates("object_id", keep="last").reset_index(drop=True)


def labels_digest(df: pd.DataFrame) -> str:
    """A short fingerprint of a labels table: the same labels, the same digest."""
    import hashlib

    h = hashlib.sha256()
    for row in df[list(COLUMNS)].itertuples(index=False):
        h.update(("\x1f".join("" if isinstance(v, float) and math.isnan(v) else str(v) for v in row) + "\x1e").encode())
    return h.hexdigest()[:16]


def export_labels(store: SurveyStore, path: str | Path, *, latest: bool = False) -> Path:
    """Write the labels (all rows, or the latest per object) to CSV or Parquet by the file's suffix.

    The CSV's text cells are made spreadsheet-safe (a cell starting with ``= + - @`` is not run as a
    formula when the file is opened in a spreadsheet).
    """
    path = Path(path)
    df = latest_labels(store) if latest else read_labels(store)
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"labels: export to {path}: use a .csv or .parquet file name")
    return write_table(df, path)
