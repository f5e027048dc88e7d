"""Explanation methods on toy detectors whose right answer is known by construction."""

from __future__ import annotations

import math

import pytest
import numpy as np
import torch
import torch.nn as nn

from gsafe_models.explain import (
    LexSelector,
    explain,
    fill_missing,
    integrated_gradients,
    latent_map,
    lex,
    select_pixels,
    nearest_neighbours,
    occlusion,
    residual,
)
from gsafe_models.faithfulness import pointing_game

B, H, W = 3, 24, 24


def _template() -> torch.Tensor:
    """The one 'normal galaxy' of the toy survey: a round Gaussian, (B, H, W)."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return (5 * torch.exp(-((yy - 12) ** 2 + (xx - 12) ** 2) / (2 * 3.0**2))).expand(B, H, W).clone()


TEMPLATE = _template()


def toy_survey(n: int, seed: int, anomaly_every: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy templates; every `anomaly_every`-th one carries a bright blob at a random place.

    Returns images (n, B, H, W) and footprints (n, H, W) bool (empty for normal objects).
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    images = TEMPLATE + 0.1 * torch.randn(n, B, H, W, generator=g)
    footprint = torch.zeros(n, H, W, dtype=torch.bool)
    for i in range(0, n, anomaly_every):
        cy, cx = torch.randint(3, H - 3, (2,), generator=g)
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
        images[i] += 3 * blob
        footprint[i] = blob > 0.1
    return images, footprint


def score_fn(x: torch.Tensor) -> torch.Tensor:
    """Anomaly score of the toy detector: squared distance to the template, (n,)."""
    return (x - TEMPLATE).pow(2).flatten(1).sum(1)


def impute_fn(x: torch.Tensor) -> torch.Tensor:
    """The toy generative model always imputes the template."""
    return TEMPLATE.expand_as(x).clone()


def test_residual_is_input_minus_reconstruction_per_band():
    x = torch.randn(2, B, H, W)
    rec = torch.randn(2, B, H, W)
    torch.testing.assert_close(residual(x, rec), x - rec)


def test_integrated_gradients_is_complete_and_stays_in_the_scored_region():
    region = torch.zeros(H, W, dtype=torch.bool)
    region[4:10, 14:20] = True

    def region_score(x):
        return ((x - TEMPLATE) * region).pow(2).flatten(1).sum(1)

    x = TEMPLATE + torch.randn(4, B, H, W)
    baseline = impute_fn(x)
    attr = integrated_gradients(region_score, x, baseline, n_steps=32)
    assert attr.shape == x.shape
    torch.testing.assert_close(attr.flatten(1).sum(1), region_score(x) - region_score(baseline), rtol=1e-4, atol=1e-3)
    assert attr[..., ~region].abs().max() == 0
    assert attr[..., region].abs().sum() > 0


def test_occlusion_finds_the_planted_blob():
    x, footprint = toy_survey(6, seed=1, anomaly_every=1)
    attr = occlusion(score_fn, x, impute_fn(x), window=4, stride=2)
    assert attr.shape == x.shape
    game = pointing_game(attr, footprint)
    assert bool(game.hit.all())
    chance = footprint.float().mean((1, 2))
    assert bool((game.share > 5 * chance).all())


def test_missing_pixels_are_imputed_before_attribution():
    x, _ = toy_survey(2, seed=2)
    x[0, 1, 3:6, 3:6] = float("nan")
    filled, imputation = fill_missing(x, impute_fn)
    assert not torch.isnan(filled).any()
    torch.testing.assert_close(filled[0, 1, 3:6, 3:6], TEMPLATE[1, 3:6, 3:6])
    for method in ("integrated_gradients", "occlusion", "residual"):
        attr = explain(method, score_fn, impute_fn, x)
        assert attr.shape == x.shape
        assert torch.isfinite(attr).all(), method
    ig = explain("integrated_gradients", score_fn, impute_fn, x)
    assert ig[0, 1, 3:6, 3:6].abs().max() == 0


def _fitted_selector() -> LexSelector:
    def batches():
        for k in range(6):
            yield toy_survey(32, seed=100 + k)[0]

    selector = LexSelector(bands=B)
    history = selector.fit(score_fn, impute_fn, batches, epochs=6, lr=3e-3, sparsity=1.0, seed=0)
    assert history[-1] < history[0]
    return selector


@pytest.fixture(scope="module")
def selector() -> LexSelector:
    return _fitted_selector()


def test_lex_selector_keeps_the_planted_blob(selector):
    x, footprint = toy_survey(16, seed=7)
    keep = selector.explain(x, impute_fn(x))
    assert keep.shape == (16, H, W)
    assert float(keep.min()) >= 0 and float(keep.max()) <= 1
    anomalous = footprint.flatten(1).any(1)
    game = pointing_game(keep[anomalous], footprint[anomalous])
    chance = footprint[anomalous].float().mean((1, 2))
    assert bool((game.share > 5 * chance).all())
    assert game.hit.float().mean() >= 0.75
    # normal objects have nothing to preserve: the smallest set is (nearly) empty
    assert keep[~anomalous].mean() < 0.1


def test_lex_selector_state_dict_round_trip(selector):
    x, _ = toy_survey(4, seed=8)
    clone = LexSelector(bands=B)
    clone.load_state_dict(selector.state_dict())
    torch.testing.assert_close(clone.explain(x, impute_fn(x)), selector.explain(x, impute_fn(x)))
    with pytest.raises(ValueError, match="imputation"):
        clone.explain(x)  # a loaded selector does not know the detector's imputer


def test_lex_fit_is_seeded_and_leaves_the_detector_alone():
    net = nn.Conv2d(B, B, 1)

    def net_score(x):
        return (x - net(x)).pow(2).flatten(1).sum(1)

    def batches():
        yield toy_survey(8, seed=3)[0]

    before = [p.detach().clone() for p in net.parameters()]
    a, b = LexSelector(bands=B), LexSelector(bands=B)
    a.fit(net_score, impute_fn, batches, epochs=2, seed=5)
    b.fit(net_score, impute_fn, batches, epochs=2, seed=5)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q)
    for p, q in zip(before, net.parameters()):
        torch.testing.assert_close(p, q.detach())
        assert q.grad is None


def test_instance_lex_keeps_the_planted_blob_and_is_seeded():
    x, footprint = toy_survey(8, seed=11, anomaly_every=1)
    attr = lex(score_fn, x, impute_fn(x), seed=2)
    assert attr.shape == x.shape
    game = pointing_game(attr, footprint)
    chance = footprint.float().mean((1, 2))
    assert bool((game.share > 5 * chance).all()) and bool(game.hit.all())
    torch.testing.assert_close(lex(score_fn, x, impute_fn(x), seed=2), attr)


def test_select_pixels_ranks_the_pixels_a_score_needs_first():
    # the score reads one 3x3 patch: every level keeps it, and nothing else
    patch = torch.zeros(H, W, dtype=torch.bool)
    patch[5:8, 15:18] = True
    f = lambda x: (x * patch).flatten(1).sum(1)  # noqa: E731
    keep = select_pixels(f, torch.ones(2, B, H, W), torch.zeros(2, B, H, W), steps=80)
    assert keep.shape == (2, H, W)
    assert float(keep[:, patch].min()) > float(keep[:, ~patch].max())


def test_explain_dispatches_every_method(selector):
    x, _ = toy_survey(3, seed=9)
    assert explain("residual", score_fn, impute_fn, x).shape == (3, B, H, W)
    assert explain("integrated_gradients", score_fn, impute_fn, x, n_steps=8).shape == (3, B, H, W)
    assert explain("occlusion", score_fn, impute_fn, x, window=6, stride=6).shape == (3, B, H, W)
    assert explain("lex", score_fn, impute_fn, x, selector=selector).shape == (3, H, W)
    assert explain("lex", score_fn, impute_fn, x).shape == (3, B, H, W)  # per instance
    with pytest.raises(ValueError, match="counterfactual_fn"):
        explain("duplex", score_fn, impute_fn, x)
    assert explain("duplex", score_fn, impute_fn, x, counterfactual_fn=impute_fn).shape == (3, B, H, W)
    with pytest.raises(ValueError, match="unknown method"):
        explain("saliency", score_fn, impute_fn, x)


def test_nearest_neighbours_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    query, bank = torch.randn(37, 5, generator=g), torch.randn(101, 5, generator=g)
    idx, dist = nearest_neighbours(query, bank, k=4, block=16)  # small blocks: exercises the merge
    brute = torch.cdist(query, bank)
    want_dist, want_idx = brute.topk(4, dim=1, largest=False)
    torch.testing.assert_close(dist, want_dist)
    assert torch.equal(idx, want_idx)
    with pytest.raises(ValueError):
        nearest_neighbours(query, bank, k=102)


def test_latent_map_falls_back_to_pca_for_tiny_surveys():
    z = torch.zeros(6, 4)
    z[:, 2] = torch.arange(6.0)  # all variance along one axis
    xy = latent_map(z)
    assert xy.shape == (6, 2)
    assert math.isclose(float(xy[:, 0].std()), float(z[:, 2].std()), rel_tol=1e-5)
    assert latent_map(torch.randn(1, 3)).shape == (1, 2)


def _separated(xy: torch.Tensor, n: int) -> bool:
    """Every point of the first `n` is nearer its own group's centre than the other group's."""
    a, b = xy[:n].mean(0), xy[n:].mean(0)
    first = (xy[:n] - a).norm(dim=1) < (xy[:n] - b).norm(dim=1)
    second = (xy[n:] - b).norm(dim=1) < (xy[n:] - a).norm(dim=1)
    return bool(first.all() and second.all())


def test_latent_map_tsne_is_seeded_and_keeps_groups_apart():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g) + 8])
    xy = latent_map(z, seed=3)
    assert xy.shape == (80, 2) and torch.isfinite(xy).all()
    torch.testing.assert_close(latent_map(z, seed=3), xy)
    assert _separated(xy, 40)
    with pytest.raises(ValueError, match="method"):
        latent_map(z, method="isomap")


def test_latent_map_partly_whitens_the_latents():
    # principal spreads become the singular values (relative to the largest) to the power: a
    # direction 10^4 times weaker in variance is 10 times weaker at 0.5, not 100; numerical noise goes
    from gsafe_models.explain import whiten

    g = np.random.default_rng(0)
    z = np.concatenate([100 * g.standard_normal((500, 1)), g.standard_normal((500, 1)), 1e-9 * g.standard_normal((500, 3))], 1)
    w = whiten(z, power=0.5)
    assert w.shape == (500, 2)
    spread = w.std(0)
    np.testing.assert_allclose(spread[1] / spread[0], 0.1, rtol=0.1)
    assert whiten(np.outer(np.arange(20.0), np.ones(3))).shape == (20, 2)  # one direction: padded


@pytest.mark.slow  # numba compiles UMAP in every new process: ~30 s
def test_latent_map_umap_is_seeded():
    z = torch.cat([torch.randn(20, 6), torch.randn(20, 6) + 8])
    xy = latent_map(z, seed=3, method="umap")
    assert xy.shape == (40, 2)
    assert torch.isfinite(xy).all()
    torch.testing.assert_close(latent_map(z, seed=3, method="umap"), xy)
    assert _separated(xy, 20)
