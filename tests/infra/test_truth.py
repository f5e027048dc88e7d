"""Truth tables joined onto a store: a merge, never a reset of rows the table does not name."""

from __future__ import annotations

import numpy as np

from infra.store import SurveyStore
from infra.truth import attach_truth


def _store(url: str, ids: list[str]) -> SurveyStore:
    s = SurveyStore.create(url, bands=("g",), height=4, width=4, chunk_size=2)
    s.append(np.zeros((len(ids), 1, 4, 4), np.float32), {"object_id": np.array(ids)})
    return s


def _truth(ids, labels, classes, footprint_value):
    return {"object_id": np.array(ids), "label": np.array(labels, np.int8), "anomaly_class": np.array(classes),
            "footprint": np.full((len(ids), 4, 4), footprint_value, np.uint8)}


def test_truth_joined_twice_keeps_the_first_tables_labels(tmp_store_url):
    s = _store(tmp_store_url, ["a", "b", "c"])
    assert attach_truth(s, _truth(["a", "zz"], [1], ["lens"], 1) | {"label": np.array([1, 0], np.int8),
                                                                    "anomaly_class": np.array(["lens", ""])}) == 1
    assert attach_truth(SurveyStore.open(tmp_store_url, mode="r+"), _truth(["c"], [0], [""], 0)) == 1
    s = SurveyStore.open(tmp_store_url)
    cat = s.read_catalog(["label", "anomaly_class"])
    assert cat["label"].tolist() == [1, -1, 0]              # 'a' keeps the label of the first table
    assert cat["anomaly_class"].tolist() == ["lens", "", ""]
    assert s.read_aux("footprint")[:, 0, 0].tolist() == [1, 0, 0]


def test_truth_after_more_rows_were_appended_covers_them(tmp_store_url):
    s = _store(tmp_store_url, ["a"])
    attach_truth(s, _truth(["a"], [1], ["trail"], 1))
    other = SurveyStore.open(tmp_store_url, mode="r+")      # another writer appends meanwhile
    other.append(np.zeros((2, 1, 4, 4), np.float32), {"object_id": np.array(["b", "c"])})
    assert attach_truth(s, _truth(["b"], [0], [""], 0)) == 1   # `s` opened before the append
    cat = SurveyStore.open(tmp_store_url).read_catalog(["object_id", "label"])
    assert cat["label"].tolist() == [1, 0, -1]
