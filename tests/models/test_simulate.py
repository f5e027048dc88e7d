"""Tests of the GalSim survey simulator (gsafe_models/simulate.py)."""

import math

import numpy as np
import pytest

from gsafe_models.simulate import (
    _HOSTS,
    _INJECTORS,
    _ZERO_POINT,
    ANOMALY_CLASSES,
    ANOMALY_KINDS,
    DEFAULT_BANDS,
    SimulatedBatch,
    _Conditions,
    _draw_galaxy,
    _simulate_object,
    _Survey,
    simulate_batch,
)

FIELDS = ("images", "object_id", "label", "anomaly_class", "footprint", "ra", "dec")
ORIGINAL = ("lens", "merger", "trail", "cosmic_ray", "saturated_star", "blend_point")
NEW = tuple(c for c in ANOMALY_CLASSES if c not in ORIGINAL)


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
    expected = k / len(ANOMALY_CLASSES)
    assert all(abs(v - expected) < 4 * math.sqrt(expected) for v in counts.values()), counts


def test_classes_restriction_honoured():
    batch = simulate_batch(0, 40, anomaly_frac=1.0, classes=("trail", "cosmic_ray"), size=32)
    assert set(batch.anomaly_class) == {"trail", "cosmic_ray"}
    assert batch.label.all()
    assert simulate_batch(0, 40, anomaly_frac=0.0, classes=(), size=16).label.sum() == 0


@pytest.mark.parametrize("cls", ANOMALY_CLASSES)
def test_each_class_adds_flux_inside_its_footprint(cls):
    """The same object drawn with and without its anomaly (same host, same noise draws): in
    some band the anomaly changes the image, on average over its footprint, by more than half
    the sky noise per pixel and by more than 5 sigma summed over the footprint (a dust lane
    takes light away); the original six classes add more than the sky noise per pixel."""
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
        per_pixel = np.abs(added[:, fp].mean(axis=1)) / sky
        assert per_pixel.max() > 0.5, (i, per_pixel)
        assert (per_pixel * math.sqrt(fp.sum())).max() > 5.0, (i, per_pixel, fp.sum())
        if cls in ORIGINAL:
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
    for cls, most in (("trail", 3), ("cosmic_ray", 1), ("hot_column", 1), ("crosstalk", 1), ("emission_line", 1)):
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


# ---------------------------------------------------------------------------------------------
# The classes added for the leave-one-class-out protocol, and the normal objects they must not touch


def test_normal_objects_are_the_ones_drawn_before_the_new_classes():
    """Values computed from the simulator before the new classes were added (6 classes), at its
    defaults: a projection of each normal cutout on a fixed random vector, and its sum. Any change
    to the scene stream or the drawing of normal objects moves them far beyond float rounding."""
    batch = simulate_batch(0, 20, anomaly_frac=0.0)
    pixels = batch.images.reshape(20, -1).astype(np.float64)
    w = np.random.default_rng(12345).standard_normal(pixels.shape[1])
    projection = [2254.3221, -2690.7693, 115.0798, 610.7553, 1361.4578, -472.9551, -2104.2619, -969.4901,
                  3983.1541, 3112.4013, -660.9057, 917.7061, -1391.6953, -1611.8877, 4271.4288, -1254.0246,
                  2179.3831, 2015.0406, -1951.976, 1980.372]
    total = [54631.1848, 95090.7646, 43230.0804, 8081.1312, 29401.933, 10333.6396, 100729.4393, 188780.2725,
             300780.1238, 501712.3025, 33263.4944, 49541.4747, 13009.159, 12417.7736, 167834.9524, 75800.5815,
             59102.9639, 116647.4069, 26859.6616, 15115.5819]
    np.testing.assert_allclose(pixels @ w, projection, rtol=1e-5, atol=0.05)
    np.testing.assert_allclose(pixels.sum(axis=1), total, rtol=1e-6, atol=0.05)


def test_normal_objects_do_not_depend_on_the_classes():
    old = simulate_batch(0, 30, seed=4, anomaly_frac=0.3, classes=ORIGINAL, size=32, bands=("g", "i"))
    new = simulate_batch(0, 30, seed=4, anomaly_frac=0.3, classes=NEW, size=32, bands=("g", "i"))
    np.testing.assert_array_equal(old.label, new.label)
    normal = old.label == 0
    assert normal.sum() >= 10
    np.testing.assert_array_equal(old.images[normal], new.images[normal])


def test_kinds_cover_exactly_the_classes_original_ones_first():
    assert ANOMALY_CLASSES[: len(ORIGINAL)] == ORIGINAL
    assert len(set(ANOMALY_CLASSES)) == len(ANOMALY_CLASSES) >= len(ORIGINAL) + 6
    assert set(ANOMALY_KINDS) == set(ANOMALY_CLASSES) == set(_INJECTORS)
    assert set(_HOSTS) <= set(ANOMALY_CLASSES)
    for origin, extent, signature in ANOMALY_KINDS.values():
        assert origin in ("astrophysical", "instrumental")
        assert extent in ("compact", "extended")
        assert signature in ("morphological", "photometric")
    # the set is varied: every value of every axis is taken by some new class
    for axis in range(3):
        assert len({ANOMALY_KINDS[c][axis] for c in NEW}) == 2
    assert all(len(c) <= 16 for c in ANOMALY_CLASSES)  # SimulatedBatch.anomaly_class is <U16


def test_new_classes_chunks_equal_whole():
    whole = simulate_batch(3, 16, seed=9, anomaly_frac=1.0, classes=NEW, size=32)
    assert set(whole.anomaly_class) <= set(NEW) and len(set(whole.anomaly_class)) >= 5
    parts = [simulate_batch(s, k, seed=9, anomaly_frac=1.0, classes=NEW, size=32) for s, k in ((3, 7), (10, 9))]
    _assert_same(whole, _concat(parts))
    _assert_same(whole, simulate_batch(3, 16, seed=9, anomaly_frac=1.0, classes=NEW, size=32))


def _component(cls: str, i: int, bands=DEFAULT_BANDS, size: int = 64, face_on: bool = False):
    """The noiseless anomaly of class `cls` drawn as the simulator draws it, with its survey,
    conditions and central object (the replaced host, or None when the anomaly is the object)."""
    spec = _Survey.of(0, 1.0, (cls,), bands, size, 0.2)
    rng = np.random.default_rng([21, i])
    cond = _Conditions(spec, rng)
    host = _draw_galaxy(spec, rng, 2e4, 0.0, 0.0)
    central = _HOSTS[cls](spec, rng, host) if cls in _HOSTS else host
    if face_on:
        host.g = 0.0
    return spec, cond, central, _INJECTORS[cls](spec, rng, cond, central if central is not None else host)


def _radius(size: int) -> np.ndarray:
    """Distance of each pixel centre from the cutout centre, pixels."""
    t = np.arange(size) - 0.5 * (size - 1)
    return np.hypot(*np.meshgrid(t, t, indexing="ij"))


def test_dropout_vanishes_in_the_bluest_band():
    for i in range(5):
        _, _, central, model = _component("dropout", i)
        assert central is None  # the dropout is the object
        flux = model.sum(axis=(1, 2))
        assert flux[0] < 0.15 * flux.max(), flux  # g: at most 10% transmitted, UV slope aside
        assert flux[-1] > 0.3 * flux.max(), flux  # y: at least half transmitted
        assert np.argmax(flux) >= 2, flux
    # with a u band, a z~3 Lyman-break galaxy drops out of u but shows in g
    _, _, _, model = _component("dropout", 0, bands=("u", "g", "r", "i"), size=32)
    flux = model.sum(axis=(1, 2))
    assert flux[0] < 0.15 * flux.max() and flux[-1] > 0.3 * flux.max(), flux


def test_emission_line_boosts_one_band_by_an_extreme_equivalent_width():
    for i in range(6):
        spec, _, central, model = _component("emission_line", i)
        flux = model.sum(axis=(1, 2))
        lit = np.flatnonzero(flux > 0)
        assert len(lit) == 1
        b = int(lit[0])
        assert spec.bands[b] != "u"  # [OIII] 5007 reaches g at z >= 0, never u
        continuum = central.flux * central.sed_disk[b]  # a pure disk: all of the host's light
        assert 0.3 < flux[b] / continuum < 4.0, flux[b] / continuum  # 1 + EW (1 + z) / width


def test_dust_lane_takes_light_away_more_in_the_blue_and_along_a_lane():
    for i in range(5):
        spec, cond, central, model = _component("dust_lane", i)
        host = cond.draw(central.profiles())
        assert model.max() <= 1e-6 * host.max()  # absorption only
        lost = -model.sum(axis=(1, 2)) / host.sum(axis=(1, 2))
        assert 0.05 < lost.min() and lost.max() < 0.6, lost
        assert lost[0] > lost[-1], lost  # g loses more than y
        fraction = -model[0] / np.maximum(host[0], 1e-9)
        bright = host[0] > 0.1 * host[0].max()
        assert fraction[bright].max() > 2.0 * lost[0]  # a lane, not a uniform dimming


def test_ring_has_more_light_in_an_annulus_than_at_its_centre():
    for i in range(5):
        spec, _, _, model = _component("ring", i, face_on=True)
        r = _radius(spec.size) * spec.scale
        band = model[2]
        profile = [band[(r >= lo) & (r < lo + 0.2)].mean() for lo in np.arange(0.0, 4.0, 0.2)]
        peak = int(np.argmax(profile))
        assert peak * 0.2 >= 1.0, profile  # the ring lies at >= 1.5" less an offset of its nucleus
        assert profile[0] < 0.5 * profile[peak], profile


def test_lsb_is_large_and_faint():
    for i in range(5):
        spec, _, central, model = _component("lsb", i)
        assert central is None
        g = model[0]
        r = _radius(spec.size) * spec.scale
        assert g[r < 1.0].sum() < 0.25 * g.sum()  # most of the light beyond 1"
        area = (r < 2.5).sum() * spec.scale**2
        mean_sb = _ZERO_POINT - 2.5 * math.log10(g[r < 2.5].sum() / area)
        assert mean_sb > 23.5, mean_sb  # mag / arcsec^2: fainter than its brightest centre


def test_clumps_are_bluer_than_their_disk():
    for i in range(5):
        _, _, central, model = _component("clumpy", i)
        flux = model.sum(axis=(1, 2))
        host_sed = central.bulge_frac * central.sed_bulge + (1 - central.bulge_frac) * central.sed_disk
        assert flux[0] / flux[-1] > host_sed[0] / host_sed[-1]


def test_detector_artefacts_are_not_seen_through_the_psf():
    for i in range(6):
        spec, _, _, column = _component("hot_column", i, size=48)
        lit = np.flatnonzero(column.max(axis=(1, 2)) > 0)
        assert len(lit) == 1
        pixels = np.argwhere(column[lit[0]] > 0)
        along_rows = len(np.unique(pixels[:, 1])) <= 2  # a column one or two pixels wide
        along_cols = len(np.unique(pixels[:, 0])) <= 2  # or a row
        assert along_rows or along_cols
        assert len(pixels) >= spec.size // 4
        _, _, _, ghost = _component("ghost", i, size=48)
        assert (ghost >= 0).all() and (ghost.max(axis=(1, 2)) > 0).all()  # in every band
        strongest = ghost[np.argmax(ghost.max(axis=(1, 2)))]
        assert (strongest > 0.5 * strongest.max()).sum() >= 50  # extended, with sharp edges
        _, _, _, xtalk = _component("crosstalk", i, size=48)
        assert (xtalk.max(axis=(1, 2)) > 0).sum() == 1
