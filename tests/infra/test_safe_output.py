"""Safe outputs: CSV cells a spreadsheet will not run, npz member names that stay in their archive."""

from __future__ import annotations

import csv
import io
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, strategies as st

from infra.safe_output import FORMULA_TRIGGERS, safe_npz_key, spreadsheet_safe


# ---- spreadsheet_safe -------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["=1+2", "+1+2", "-1+2", "@SUM(A1:A9)", "\t=1", "\r=1", "=HYPERLINK(\"http://x\")",
                                  "-cmd|' /C calc'!A0", "+", "-", "=", "@"])
def test_formula_cells_are_neutralised(cell):
    assert spreadsheet_safe(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["-1.5", "+3", "-2e-5", "1e10", ".5", "-0", "NGC 4993", "", "a=b", "obj-1"])
def test_numbers_and_plain_text_are_kept(cell):
    assert spreadsheet_safe(cell) == cell


def test_dataframe_keeps_numeric_columns_numeric_and_neutralises_text_and_headers():
    df = pd.DataFrame({"object_id": ["=cmd()", "ok", "-3"], "score": [-1.5, 2.0, -0.25], "rank": [1, 2, 3],
                       "=evil": ["@x", "y", None]})
    out = spreadsheet_safe(df)
    assert list(out.columns) == ["object_id", "score", "rank", "'=evil"]
    assert list(out["object_id"]) == ["'=cmd()", "ok", "-3"]
    assert out["score"].dtype == np.float64 and list(out["score"]) == [-1.5, 2.0, -0.25]
    assert out["rank"].dtype == df["rank"].dtype
    assert list(out["'=evil"])[:2] == ["'@x", "y"] and pd.isna(out["'=evil"].iloc[2])
    assert list(df["object_id"]) == ["=cmd()", "ok", "-3"]  # the input is not changed
    text = out.to_csv(index=False)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1][0] == "'=cmd()" and rows[1][1] == "-1.5"


def test_series_arrays_and_lists():
    assert list(spreadsheet_safe(pd.Series(["=a", "b"], name="@n"))) == ["'=a", "b"]
    assert spreadsheet_safe(pd.Series(["=a"], name="@n")).name == "'@n"
    assert list(spreadsheet_safe(np.array(["=a", "b"]))) == ["'=a", "b"]
    np.testing.assert_array_equal(spreadsheet_safe(np.array([-1.0, 2.0])), [-1.0, 2.0])
    assert spreadsheet_safe(("=a", -1)) == ("'=a", -1)
    assert spreadsheet_safe([b"=x"]) == ["'=x"]


@given(st.text())
def test_no_neutralised_cell_starts_with_a_trigger(text):
    out = spreadsheet_safe(text)
    assert not out.startswith(FORMULA_TRIGGERS) or float(out) == float(text)
    assert out in (text, "'" + text)


# ---- safe_npz_key -----------------------------------------------------------------------------
def test_plain_ids_are_their_own_key():
    taken: set[str] = set()
    assert [safe_npz_key(i, taken) for i in ["obj42", "HSC-1234_5.6", "a"]] == ["obj42", "HSC-1234_5.6", "a"]
    assert taken == {"obj42", "HSC-1234_5.6", "a"}


@pytest.mark.parametrize("oid", ["../../etc/passwd", "/abs", "a/b", "a\\b", "..", ".", ".hidden", "-rf", "CON",
                                 "nul.txt", "a\x00b", "", "é", "x" * 500, "b\ud800", "a b"])
def test_unsafe_ids_get_a_safe_stable_key(oid):
    key = safe_npz_key(oid, set())
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", key), key
    assert safe_npz_key(oid, set()) == key  # stable


def test_ids_that_clean_alike_get_different_keys_and_repeats_count_on():
    taken: set[str] = set()
    a, b = safe_npz_key("a/b", taken), safe_npz_key("a\\b", taken)
    assert a != b and a.startswith("a_b-") and b.startswith("a_b-")
    again = safe_npz_key("a/b", taken)
    assert again == a + "-2"
    assert safe_npz_key("a_b", taken) == "a_b"


def test_keys_make_an_archive_whose_members_stay_inside(tmp_path):
    ids = ["../../x", "ok", "/etc/y", "CON", "ok"]
    taken: set[str] = set()
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as z:
        for i, oid in enumerate(ids):
            buf = io.BytesIO()
            np.save(buf, np.full(2, i))
            z.writestr(f"{safe_npz_key(oid, taken)}.npy", buf.getvalue())
    with np.load(tmp_path / "a.npz") as z:
        assert len(z.files) == 5 and all("/" not in k and not k.startswith(".") for k in z.files)
        assert sorted(int(z[k][0]) for k in z.files) == [0, 1, 2, 3, 4]



def test_write_table_neutralises_csv_and_keeps_parquet_exact(tmp_path):
    from infra.safe_output import write_table

    df = pd.DataFrame({"object_id": ["=HYPERLINK(\"http://evil\")", "NGC 4993"], "score": [-1.5, 3.0]})
    csv_path = write_table(df, tmp_path / "out" / "scores.csv")          # the folder is made
    rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    assert rows[1][:2] == ["'=HYPERLINK(\"http://evil\")", "-1.5"] and rows[2][0] == "NGC 4993"
    back = pd.read_parquet(write_table(df, tmp_path / "scores.parquet"))
    pd.testing.assert_frame_equal(back, df)
