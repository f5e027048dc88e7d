"""How faithful an attribution map is: deletion/insertion curves, weight randomization, pointing game.

Attribution maps come as ``(n, B, H, W)`` (integrated gradients, occlusion, residual) or
``(n, H, W)`` (LEX); every metric here first collapses them to a per-pixel importance ``(n, H, W)``
by summing ``|attribution|`` over bands, since a pixel is deleted or kept in all bands at once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import rankdata
from torch import Tensor

from .explain import fill_from_baseline

__all__ = [
    "pixel_importance",
    "deletion_curve",
    "insertion_curve",
    "curve_auc",
    "spearman",
    "randomize_weights",
    "randomization_check",
    "PointingGame",
    "pointing_game",
]


def pixel_importance(attribution: Tensor) -> Tensor:
    r"""Returns ``(n, H, W)``: ``|attribution|`` summed over bands (or ``|attribution|`` if 3-D).

    Example:
        >>> pixel_importance(-torch.ones(1, 3, 2, 2))[0]
        tensor([[3., 3.],
                [3., 3.]])
    """
    attribution = torch.as_tensor(attribution, dtype=torch.float32)
    if attribution.dim() == 4:
        return torch.nan_to_num(attribution.abs(), nan=0.0).sum(dim=1)
    if attribution.dim() == 3:
        return torch.nan_to_num(attribution.abs(), nan=0.0)
    raise ValueError(f"attribution: expected (n, B, H, W) or (n, H, W), got {tuple(attribution.shape)}")


def deletion_curve(
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    baseline: Tensor,
    attribution: Tensor,
    steps: int = 20,
    normalize: bool = False,
    batch_size: int = 64,
) -> Tensor:
    r"""Returns the deletion curve ``(n, steps + 1)``: the score as the most-attributed pixels go.

    Point ``k`` scores the cutout with its ``k / steps`` most important pixels (all bands)
    replaced by the baseline (the model's imputation): point 0 is ``score(images)``, the last is
    ``score(baseline)``. A faithful map makes the score fall fast: a low :func:`curve_auc`.

    Arguments:
        score_fn: anomaly score ``(n, B, H, W) -> (n,)``.
        images: cutouts ``(n, B, H, W)``; NaN pixels are taken from ``baseline``.
        baseline: the model's imputation ``(n, B, H, W)``.
        attribution: ``(n, B, H, W)`` or ``(n, H, W)``; ranked by :func:`pixel_importance`.
        steps: curve segments.
        normalize: rescale each curve to 1 at ``score(images)`` and 0 at ``score(baseline)``.
        batch_size: cutouts per ``score_fn`` call.

    References:
        | RISE: Randomized Input Sampling for Explanation of Black-box Models (Petsiuk et al., 2018)
        | https://arxiv.org/abs/1806.07421

    Example:
        >>> f = lambda x: x.flatten(1).sum(1)
        >>> x = torch.ones(1, 1, 2, 2)
        >>> deletion_curve(f, x, torch.zeros_like(x), torch.rand(1, 2, 2), steps=4)
        tensor([[4., 3., 2., 1., 0.]])
    """
    images, baseline = fill_from_baseline(images, baseline)
    return _curve_between(score_fn, images, baseline, attribution, steps, normalize, batch_size, deleting=True)


def insertion_curve(
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    baseline: Tensor,
    attribution: Tensor,
    steps: int = 20,
    normalize: bool = False,
    batch_size: int = 64,
) -> Tensor:
    r"""Returns the insertion curve ``(n, steps + 1)``: the score as the most-attributed pixels come.

    Starts from the baseline (the model's imputation, point 0 = ``score(baseline)``) and inserts
    the cutout's pixels most important first (last point = ``score(images)``). A faithful map
    makes the score rise fast: a high :func:`curve_auc`. Arguments as :func:`deletion_curve`.

    Example:
        >>> f = lambda x: x.flatten(1).sum(1)
        >>> x = torch.ones(1, 1, 2, 2)
        >>> insertion_curve(f, x, torch.zeros_like(x), torch.rand(1, 2, 2), steps=2)
        tensor([[0., 2., 4.]])
    """
    images, baseline = fill_from_baseline(images, baseline)
    return _curve_between(score_fn, baseline, images, attribution, steps, normalize, batch_size, deleting=False)


def _curve_between(score_fn, start, end, attribution, steps, normalize, batch_size, deleting: bool) -> Tensor:
    n, _, height, width = start.shape
    importance = pixel_importance(attribution).to(start.device).flatten(1)
    if importance.shape != (n, height * width):
        raise ValueError(f"attribution {tuple(attribution.shape)} does not match cutouts {tuple(start.shape)}")
    order = importance.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(height * width, device=start.device).expand(n, -1))
    counts = torch.round(torch.linspace(0, height * width, steps + 1)).to(start.device)
    curve = torch.empty(n, steps + 1)
    group = max(1, batch_size // (steps + 1))  # objects per score_fn call, all their steps at once
    with torch.no_grad():
        for i in range(0, n, group):
            moved = (rank[i : i + group, None] < counts[None, :, None]).view(-1, steps + 1, 1, height, width)
            path = torch.where(moved, end[i : i + group, None], start[i : i + group, None])
            values = score_fn(path.flatten(0, 1)).detach().float().cpu()
            curve[i : i + group] = values.view(-1, steps + 1)
    if normalize:
        # 1 = the full cutout's score, 0 = the baseline's
        at_image, at_base = (curve[:, :1], curve[:, -1:]) if deleting else (curve[:, -1:], curve[:, :1])
        span = at_image - at_base
        curve = (curve - at_base) / torch.where(span.abs() > 0, span, torch.ones_like(span))
    return curve


def curve_auc(curve: Tensor) -> Tensor:
    r"""Returns the area under each curve ``(n,)``, trapezoids over the deleted share in ``[0, 1]``.

    Example:
        >>> curve_auc(torch.tensor([[1.0, 0.5, 0.0]]))
        tensor([0.5000])
    """
    curve = torch.as_tensor(curve, dtype=torch.float32)
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    r"""Returns the Spearman rank correlation ``(n,)`` of two importance maps per object.

    Maps ``(n, ...)`` are flattened per object; ties get average ranks. A constant map gives NaN.

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 15.0]]))
        tensor([0.5000])
    """
    ra = rankdata(np.asarray(torch.as_tensor(a).detach().float().cpu()).reshape(len(a), -1), axis=1)
    rb = rankdata(np.asarray(torch.as_tensor(b).detach().float().cpu()).reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return torch.as_tensor(rho, dtype=torch.float32)


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    r"""Returns a copy of ``model`` with every parameter re-drawn; ``model`` is untouched.

    Layers with ``reset_parameters`` (conv, linear, norm) get their own initialization again;
    any other parameter is shuffled (same values, new places). Buffers are kept.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> bool((randomize_weights(lin).weight != lin.weight).any())
        True
    """
    clone = copy.deepcopy(model)
    done: set[int] = set()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in clone.modules():
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
                done.update(id(p) for p in module.parameters(recurse=False))
        for parameter in clone.parameters():
            if id(parameter) not in done and parameter.numel() > 1:
                flat = parameter.view(-1)
                flat.copy_(flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)])
    return clone


def randomization_check(
    attr_fn: Callable[[nn.Module], Tensor],
    model: nn.Module,
    seed: int = 0,
) -> Tensor:
    r"""Model-randomization sanity check: Spearman correlation ``(n,)`` of trained vs random maps.

    ``attr_fn(model)`` explains a fixed set of cutouts with the given model, returning
    ``(n, B, H, W)`` or ``(n, H, W)``; it is called on ``model`` and on
    :func:`randomize_weights` of it. A method that explains the model, not just the image,
    gives maps that change: a correlation well below 1.

    References:
        | Sanity Checks for Saliency Maps (Adebayo et al., 2018)
        | https://arxiv.org/abs/1810.03292

    Example:
        >>> net = nn.Linear(4, 1)
        >>> x = torch.randn(3, 1, 2, 2)
        >>> grad = lambda m: torch.func.vmap(torch.func.grad(lambda v: m(v.flatten()).sum()))(x)
        >>> randomization_check(grad, net).shape
        torch.Size([3])
    """
    trained = pixel_importance(attr_fn(model))
    randomized = pixel_importance(attr_fn(randomize_weights(model, seed=seed)))
    return spearman(trained, randomized)


class PointingGame(NamedTuple):
    r"""Per object: ``share`` of importance mass inside the footprint and ``hit`` (max inside)."""

    share: Tensor
    hit: Tensor


def pointing_game(attribution: Tensor, footprint: Tensor) -> PointingGame:
    r"""Returns ``(share (n,), hit (n,))`` of an attribution against the true anomaly footprint.

    ``share`` is the fraction of :func:`pixel_importance` mass inside ``footprint``; ``hit`` is
    whether the most important pixel lies inside it. Objects with an empty footprint (normal ones)
    or an all-zero map get ``share = NaN`` and ``hit = False``. Chance level is the footprint's
    area share.

    Arguments:
        attribution: ``(n, B, H, W)`` or ``(n, H, W)``.
        footprint: ``(n, H, W)`` bool, True on the injected anomaly (the simulator's footprint).

    References:
        | Top-down Neural Attention by Excitation Backprop (Zhang et al., 2016)
        | https://arxiv.org/abs/1608.00507

    Example:
        >>> attr = torch.tensor([[[3.0, 1.0], [0.0, 0.0]]])
        >>> pointing_game(attr, torch.tensor([[[True, False], [False, False]]]))
        PointingGame(share=tensor([0.7500]), hit=tensor([True]))
    """
    importance = pixel_importance(attribution).flatten(1)
    footprint = torch.as_tensor(footprint).to(importance.device).bool().flatten(1)
    if footprint.shape != importance.shape:
        raise ValueError(f"pointing_game: footprint {tuple(footprint.shape)} does not match the maps")
    total = importance.sum(1)
    inside = (importance * footprint).sum(1)
    valid = footprint.any(1) & (total > 0)
    share = torch.where(valid, inside / torch.where(total > 0, total, torch.ones_like(total)), torch.nan)
    hit = valid & footprint.gather(1, importance.argmax(1, keepdim=True))[:, 0]
    return PointingGame(share=share, hit=hit)
