"""Tests of the GalSim survey simulator (gsafe_models/simulate.py)."""

import math

import numpy as np
import pytest

from gsafe_models.simulate import (
    ANOMALY_CLASSES,
    DEFAULT_BANDS,
    SimulatedBatch,
    _simulate_object,
    _Survey,
    simulate_batch,
)

FIELDS = ("images", "object_id", "label", "anomaly_class", "footprint", "ra", "dec")


def _concat(batches: list[SimulatedBatch]) -> SimulatedBatch:
    return SimulatedBatch(*(np.concatenate([getattr(b, f) for b in batches]) for f in FIELDS))


def _assert_same(a: SimulatedBatch, b: SimulatedBatch) -> None:
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.fixture(scope="module")
def mixed() -> SimulatedBatch:
    return simulate_batch(40, 24, seed=7, anomaly_frac=0.5, size=48)


def test_shapes_dtypes_and_ids(mixed):
    n, b, h = 24, len(DEFAULT_BANDS), 48
    assert mixed.images.shape == (n, b, h, h) and mixed.images.dtype == np.float32
    assert mixed.footprint.shape == (n, h, h) and mixed.footprint.dtype == np.uint8
    assert mixed.label.shape == (n,) and mixed.label.dtype == np.int8
    assert mixed.ra.dtype == np.float64 and mixed.dec.dtype == np.float64
    assert mixed.object_id[0] == "sim7-000000040" and mixed.object_id[-1] == "sim7-000000063"
    assert len(set(mixed.object_id)) == n
    assert np.all(np.abs(mixed.dec - 2.0) <= 0.5) and np.all(np.abs(mixed.ra - 150.0) <= 0.51)
    assert np.isfinite(mixed.images).all()
    assert set(np.unique(mixed.footprint)) <= {0, 1}


def test_label_matches_class_and_normals_have_empty_footprint(mixed):
    normal = mixed.label == 0
    assert normal.any() and (~normal).any()
    assert np.all(mixed.anomaly_class[normal] == "")
    assert set(mixed.anomaly_class[~normal]) <= set(ANOMALY_CLASSES)
    assert mixed.footprint[normal].sum() == 0
    assert np.all(mixed.footprint[~normal].sum(axis=(1, 2)) > 0)


def test_same_seed_same_survey_other_seed_other_survey(mixed):
    _assert_same(mixed, simulate_batch(40, 24, seed=7, anomaly_frac=0.5, size=48))
    other = simulate_batch(40, 24, seed=8, anomaly_frac=0.5, size=48)
    assert not np.array_equal(mixed.images, other.images)
    assert not np.array_equal(mixed.ra, other.ra)


def test_chunks_equal_whole(mixed):
    parts = [simulate_batch(s, k, seed=7, anomaly_frac=0.5, size=48) for s, k in ((40, 5), (45, 0), (45, 19))]
    _assert_same(mixed, _concat(parts))


def test_normal_objects_do_not_depend_on_anomaly_frac():
    few = simulate_batch(0, 30, seed=3, anomaly_frac=0.1, size=32, bands=("r", "i"))
    many = simulate_batch(0, 30, seed=3, anomaly_frac=0.6, size=32, bands=("r", "i"))
    assert np.all(many.label >= few.label)  # an anomaly at 10% stays one at 60%
    both = (few.label == 0) & (many.label == 0)
    assert both.sum() >= 5
    np.testing.assert_array_equal(few.images[both], many.images[both])


def test_anomaly_fraction_and_classes_honoured():
    n, frac = 1200, 0.25
    batch = simulate_batch(0, n, seed=1, anomaly_frac=frac, bands=("i",), size=16)
    k = int(batch.label.sum())
    assert abs(k - n * frac) < 4 * math.sqrt(n * frac * (1 - frac))
    counts = {c: int((batch.anomaly_class == c).sum()) for c in ANOMALY_CLASSES}
    assert sum(counts.values()) == k
    assert all(abs(v - k / 6) < 4 * math.sqrt(k / 6) for v in counts.values()), counts


def test_classes_restriction_honoured():
    batch = simulate_batch(0, 40, anomaly_frac=1.0, classes=("trail", "cosmic_ray"), size=32)
    assert set(batch.anomaly_class) == {"trail", "cosmic_ray"}
    assert batch.label.all()
    assert simulate_batch(0, 40, anomaly_frac=0.0, classes=(), size=16).label.sum() == 0


@pytest.mark.parametrize("cls", ANOMALY_CLASSES)
def test_each_class_adds_flux_inside_its_footprint(cls):
    """The same object drawn with and without its anomaly (same host, same noise draws): in
    some band the anomaly adds more than the sky noise, on average over its footprint."""
    spec = _Survey.of(11, 1.0, (cls,), DEFAULT_BANDS, 64, 0.2)
    for i in range(6):
        with_, without = _simulate_object(spec, i), _simulate_object(spec, i, inject=False)
        assert with_.anomaly_class == cls
        fp = with_.footprint.astype(bool)
        assert 0 < fp.sum() < fp.size
        assert not without.footprint.any()
        assert np.isfinite(with_.image).all()
        added = with_.image.astype(np.float64) - without.image
        centred = without.image - np.median(without.image, axis=(1, 2), keepdims=True)
        sky = 1.4826 * np.median(np.abs(centred), axis=(1, 2))  # robust: the sky dominates the cutout
        assert max(added[b][fp].mean() / sky[b] for b in range(len(sky))) > 1.0


def test_saturated_star_saturates_and_bleeds_normals_do_not():
    star = simulate_batch(0, 6, seed=2, anomaly_frac=1.0, classes=("saturated_star",))
    level = star.images.max()
    assert all((im == level).sum() >= 10 for im in star.images)
    # bleed: some saturated column is longer than the star's saturated core is wide
    runs = [(im == level).sum(axis=(0, 1)).max() for im in star.images]
    assert max(runs) > 5
    normal = simulate_batch(0, 50, seed=2, anomaly_frac=0.0)
    assert normal.images.max() < 0.5 * level


def test_trail_and_cosmic_ray_stay_in_few_bands():
    for cls, most in (("trail", 3), ("cosmic_ray", 1)):
        spec = _Survey.of(5, 1.0, (cls,), DEFAULT_BANDS, 48, 0.2)
        for i in range(5):
            added = _simulate_object(spec, i).image.astype(np.float64) - _simulate_object(spec, i, inject=False).image
            touched = (np.abs(added).max(axis=(1, 2)) > 1.0).sum()
            assert 1 <= touched <= most, (cls, i, touched)


@pytest.mark.parametrize(
    "kwargs",
    [dict(classes=("lens", "glitch")), dict(bands=("g", "K")), dict(anomaly_frac=1.5), dict(seed=-1),
     dict(size=8), dict(anomaly_frac=0.1, classes=())],
)
def test_bad_arguments_say_what(kwargs):
    with pytest.raises(ValueError, match="simulate"):
        simulate_batch(0, 2, **kwargs)
