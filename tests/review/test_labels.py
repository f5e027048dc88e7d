"""Labels in the store: validated, append-only, latest wins, safe with concurrent writers, exported."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pandas as pd
import pytest

from infra import labels as lab
from infra.errors import StoreError
from infra.store import SurveyStore

HOSTILE = "=HYPERLINK(\"http://x\")<script>"


@pytest.fixture
def store(tmp_store_url) -> SurveyStore:
    s = SurveyStore.create(tmp_store_url, bands=("g",), height=4, width=4, chunk_size=4)
    ids = np.array([f"obj_{i}" for i in range(9)] + [HOSTILE], dtype=object)
    s.append(np.zeros((len(ids), 1, 4, 4), np.float32), {"object_id": ids})
    return s


def test_make_rows_refuses_what_is_not_a_label():
    with pytest.raises(ValueError, match="not a label"):
        lab.make_rows(["a"], "boring", model="m/1")
    with pytest.raises(ValueError, match="0-5"):
        lab.make_rows(["a"], "interesting", model="m/1", relevance=6)
    with pytest.raises(ValueError, match="non-empty"):
        lab.make_rows([""], "artefact", model="m/1")
    rows = lab.make_rows(["a", "b"], "artefact", model="m/1", tag=" satellite trail ", who="ana", relevance=0)
    assert rows["tag"].tolist() == ["satellite trail"] * 2 and rows["relevance"].tolist() == [0.0, 0.0]
    assert set(rows) == set(lab.COLUMNS)


def test_labels_append_and_the_latest_wins(store):
    lab.append_labels(store, lab.make_rows(["obj_1", "obj_2"], "interesting", model="m/1", who="ana"))
    lab.append_labels(store, lab.make_rows(["obj_1"], "artefact", model="m/2", tag="ghost", who="bo"))
    every = lab.read_labels(store)
    assert len(every) == 3                                       # never rewritten
    latest = lab.latest_labels(store).set_index("object_id")
    assert latest.loc["obj_1", "label"] == "artefact" and latest.loc["obj_1", "model"] == "m/2"
    assert latest.loc["obj_2", "label"] == "interesting" and np.isnan(latest.loc["obj_2", "relevance"])
    assert pd.Timestamp(latest.loc["obj_1", "when"]).tzinfo is not None
    assert lab.labels_digest(lab.latest_labels(store)) != lab.labels_digest(lab.latest_labels(every.iloc[:1]))


def test_unknown_object_ids_are_refused_and_nothing_is_written(store):
    with pytest.raises(StoreError, match="not in store"):
        lab.append_labels(store, lab.make_rows(["obj_1", "nope"], "interesting", model="m/1"))
    assert len(lab.read_labels(store)) == 0


def test_export_csv_is_spreadsheet_safe_and_parquet_exact(store, tmp_path):
    lab.append_labels(store, lab.make_rows([HOSTILE], "artefact", model="m/1", tag="-2+3"))
    csv = pd.read_csv(lab.export_labels(store, tmp_path / "l.csv"), keep_default_na=False)
    assert csv.loc[0, "object_id"] == "'" + HOSTILE and csv.loc[0, "tag"] == "'-2+3"
    parquet = pd.read_parquet(lab.export_labels(store, tmp_path / "l.parquet"))
    assert parquet.loc[0, "object_id"] == HOSTILE
    with pytest.raises(ValueError, match="csv or .parquet"):
        lab.export_labels(store, tmp_path / "l.xlsx")


def _labeller(url: str, who: str, n: int) -> None:
    s = SurveyStore.open(url, mode="r+")
    for k in range(n):
        lab.append_labels(s, lab.make_rows([f"obj_{k % 9}"], "interesting", model="m/1", who=who),
                          known_ids={f"obj_{i}" for i in range(9)})


def test_two_processes_labelling_at_once_lose_nothing(store):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_labeller, args=(store.url, who, 25)) for who in ("tab-1", "tab-2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    every = lab.read_labels(store)
    assert len(every) == 50 and every["who"].value_counts().to_dict() == {"tab-1": 25, "tab-2": 25}
