"""The anomaly gallery: a self-contained HTML page, PNG figures, the candidate table and the maps.

``write_gallery`` turns explained candidates (:class:`Card`) into ``out_dir/``::

    index.html            one file, every image inline (base64 PNG), inline CSS/JS, opens from disk
    cards/<object_id>.png one figure per candidate
    latent_map.png        2-D map of the latents, candidates marked
    score_hist.png        survey scores against the calibration (normal) distribution
    candidates.csv        the table: object_id, ra, dec, score, p_value, q_value, one column per statistic,
                          attribution_key (spreadsheet-safe: a cell never runs as a formula)
    candidates.parquet    the same table, exact
    attributions.npz      the attribution maps, keyed by object id (by `attribution_key` where the id
                          is unsafe as an archive member name)

Object ids come from users' FITS headers: the page is rendered from Jinja2 templates (`infra/templates/`)
with autoescape, so every one is HTML-escaped, and each is sanitized
before it names a file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import jinja2

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, even where a display exists

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from astropy.visualization import make_lupton_rgb

from infra.safe_output import safe_npz_key, write_table

__all__ = ["Card", "write_gallery", "composite", "safe_filename", "panels", "png", "data_uri", "card_view",
           "panel_captions", "template_environment"]

# Effective wavelengths (nm) of common optical/NIR bands, to build a red-green-blue composite
# from the three reddest distinct bands when i, r, g are not all there.
_WAVELENGTH_NM = {"u": 355, "g": 475, "r": 620, "i": 760, "z": 870, "y": 1000, "j": 1250, "h": 1650, "k": 2150}


@dataclass
class Card:
    """One explained candidate, as shown in the gallery.

    Arguments:
        object_id: catalog id (shown escaped; sanitized for file names).
        ra, dec: position, degrees.
        score: combined anomaly score.
        p_value, q_value: calibrated p-value and Benjamini-Hochberg q-value.
        statistics: one value per score statistic (``{"residual": 12.3, ...}``).
        image: the cutout ``(B, H, W)``, raw units, NaN = missing.
        reconstruction: the model's reconstruction ``(B, H, W)``, same units.
        residual: ``image - reconstruction`` ``(B, H, W)``.
        attribution: the default method's map, ``(B, H, W)`` or ``(H, W)``.
        bands: band names, ``B`` of them (``("g", "r", "i", "z", "y")``).
        label: optional free-text label (e.g. a human verdict).
        anomaly_class: optional class (e.g. the simulator's injected class).
        neighbours: optional nearest normal objects, ``[(object_id, image (B, H, W)), ...]``.
        method: name of the attribution method, shown as the panel caption.
        more_like_this: candidates of the same group (look-alikes) not shown, e.g. 12.
    """

    object_id: str
    ra: float
    dec: float
    score: float
    p_value: float
    q_value: float
    statistics: dict[str, float]
    image: np.ndarray
    reconstruction: np.ndarray
    residual: np.ndarray
    attribution: np.ndarray
    bands: tuple[str, ...]
    label: str | int | None = None
    anomaly_class: str | None = None
    neighbours: list[tuple[str, np.ndarray]] | None = field(default_factory=list)
    method: str = "attribution"
    more_like_this: int = 0


def safe_filename(object_id: str, taken: set[str] | None = None) -> str:
    """Returns a file-name stem for ``object_id``: ``[A-Za-z0-9._-]`` only, unique within ``taken``.

    An id that had to change gets a short hash of the original, so two ids never share a file.

    Example:
        >>> safe_filename("HSC 1234/5")
        'HSC_1234_5-a8c82b35'
        >>> safe_filename("obj_0042")
        'obj_0042'
    """
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(object_id))[:80].lstrip(".") or "_"
    if stem != str(object_id):
        stem = f"{stem}-{hashlib.sha1(str(object_id).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    if taken is not None:
        base, n = stem, 1
        while stem.lower() in taken:  # case-insensitive file systems
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
    return stem


def _rgb_indices(bands: tuple[str, ...], n_bands: int) -> tuple[int, int, int]:
    # i, r, g when present, else the three reddest bands by wavelength (red = reddest).
    names = [str(b).strip().lower() for b in bands][:n_bands]
    if all(b in names for b in ("i", "r", "g")):
        return names.index("i"), names.index("r"), names.index("g")
    if n_bands >= 3:
        order = sorted(range(n_bands), key=lambda k: _WAVELENGTH_NM.get(names[k] if k < len(names) else "", k))
        return order[-1], order[-2], order[-3]
    if n_bands == 2:
        return 1, 1, 0
    return 0, 0, 0


def _sky_and_stretch(image: np.ndarray, idx: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    planes = np.stack([image[k] for k in idx]).astype(np.float64)
    finite = np.isfinite(planes)
    sky = np.array([np.median(p[f]) if f.any() else 0.0 for p, f in zip(planes, finite)])
    intensity = (planes - sky[:, None, None]).mean(axis=0)
    good = intensity[np.isfinite(intensity)]
    top = np.percentile(good, 99.5) if good.size else 1.0
    return sky, float(top) if top > 0 else 1.0


def composite(
    image: np.ndarray,
    bands: tuple[str, ...],
    reference: np.ndarray | None = None,
    Q: float = 8.0,
) -> np.ndarray:
    """Returns a Lupton asinh colour composite ``(H, W, 3)`` uint8 of a cutout ``(B, H, W)``.

    Sky level and stretch come from ``reference`` (default: the image itself), so a
    reconstruction drawn with its cutout as reference is on the same scale.

    References:
        | Preparing Red-Green-Blue Images from CCD Data (Lupton et al., 2004)
        | https://arxiv.org/abs/astro-ph/0312483
    """
    image = np.asarray(image, dtype=np.float64)
    idx = _rgb_indices(tuple(bands), image.shape[0])
    sky, stretch = _sky_and_stretch(np.asarray(reference if reference is not None else image, dtype=np.float64), idx)
    planes = [np.nan_to_num(image[k] - s, nan=0.0) for k, s in zip(idx, sky)]
    with np.errstate(invalid="ignore", divide="ignore"):  # astropy divides by zero intensity on empty sky
        return make_lupton_rgb(*planes, minimum=0.0, stretch=stretch, Q=Q)


def _diverging(values: np.ndarray) -> np.ndarray:
    # Band-summed residual, symmetric colour scale: red = brighter than the model, blue = fainter.
    plane = np.nansum(np.asarray(values, dtype=np.float64), axis=0) if values.ndim == 3 else np.asarray(values, float)
    good = np.abs(plane[np.isfinite(plane)])
    vmax = np.percentile(good, 99.5) if good.size and np.percentile(good, 99.5) > 0 else 1.0
    rgba = plt.get_cmap("RdBu_r")(np.clip(0.5 + 0.5 * np.nan_to_num(plane) / vmax, 0, 1))
    return (rgba[..., :3] * 255).astype(np.uint8)


def _importance(attribution: np.ndarray) -> np.ndarray:
    attribution = np.nan_to_num(np.abs(np.asarray(attribution, dtype=np.float64)))
    return attribution.sum(axis=0) if attribution.ndim == 3 else attribution


def _overlay(image: np.ndarray, attribution: np.ndarray) -> np.ndarray:
    # Grey asinh cutout under an inferno heat map whose opacity follows the importance.
    plane = np.nan_to_num(np.nansum(np.asarray(image, dtype=np.float64), axis=0))
    plane = plane - np.median(plane)
    top = np.percentile(plane, 99.5)
    grey = np.arcsinh(np.clip(plane, 0, None) / (0.1 * top if top > 0 else 1.0))
    grey = grey / grey.max() if grey.max() > 0 else grey
    imp = _importance(attribution)
    top = np.percentile(imp, 99.5)
    level = np.clip(imp / top, 0, 1) if top > 0 else np.zeros_like(imp)
    heat = plt.get_cmap("inferno")(level)[..., :3]
    alpha = (0.85 * level)[..., None]
    out = (1 - alpha) * (0.6 * grey[..., None]) + alpha * heat
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mpimg.imsave(buffer, rgb, format="png", origin="lower")  # astronomical convention: row 0 at the bottom
    return buffer.getvalue()


def data_uri(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode("ascii")


def _fig_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _fmt(value, kind: str = "g") -> str:
    if value is None:
        return ""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.5f}" if kind == "deg" else f"{value:.3g}"


def panels(card: Card) -> dict[str, np.ndarray]:
    """The four panels of a card as ``(H, W, 3)`` uint8 images: colour composite, reconstruction (on
    the cutout's scale), band-summed residual, attribution over the cutout."""
    bands = tuple(card.bands)
    return {
        "colour": composite(card.image, bands),
        "reconstruction": composite(card.reconstruction, bands, reference=card.image),
        "residual": _diverging(np.asarray(card.residual)),
        "attribution": _overlay(card.image, card.attribution),  # captioned with card.method
    }


def _rgb_caption(bands: tuple[str, ...], n_bands: int) -> str:
    idx = _rgb_indices(bands, n_bands)
    return "colour (" + ",".join(str(bands[k]) if k < len(bands) else str(k) for k in idx) + ")"


def _card_figure(card: Card, panels: dict[str, np.ndarray], rank: int) -> bytes:
    n_nb = min(len(card.neighbours or []), 6)
    rows = 2 if n_nb else 1
    fig, axes = plt.subplots(rows, max(4, n_nb), figsize=(2.2 * max(4, n_nb), 2.4 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    captions = panel_captions(card)
    for ax, (name, rgb), caption in zip(axes[0], panels.items(), captions):
        ax.imshow(rgb, interpolation="nearest", origin="lower")
        ax.set_title(caption, fontsize=9, parse_math=False)
    for ax, (nb_id, nb_image) in zip(axes[1] if n_nb else [], (card.neighbours or [])[:n_nb]):
        ax.imshow(composite(nb_image, tuple(card.bands)), interpolation="nearest", origin="lower")
        ax.set_title(f"neighbour {nb_id}"[:40], fontsize=8, parse_math=False)
    title = (
        f"#{rank} {card.object_id}   RA {_fmt(card.ra, 'deg')}  Dec {_fmt(card.dec, 'deg')}   "
        f"score {_fmt(card.score)}  p {_fmt(card.p_value)}  q {_fmt(card.q_value)}"
    )
    fig.suptitle(title[:160], fontsize=10, parse_math=False)
    return _fig_png(fig)


def _latent_figure(latent_xy, latent_labels, cards: list[Card]) -> bytes:
    xy = np.asarray(latent_xy, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    rank_of = {str(c.object_id): r for r, c in enumerate(cards, 1)}
    labels = np.asarray(["" if v is None else str(v) for v in latent_labels]) if latent_labels is not None else None
    if labels is None or len(labels) != len(xy):
        labels = np.full(len(xy), "objects")
    is_card = np.array([lab in rank_of for lab in labels], dtype=bool)
    names, counts = np.unique(labels[~is_card], return_counts=True)
    # Big groups first and small: a handful of anomalies must not hide under thousands of normals.
    for name, count in sorted(zip(names, counts), key=lambda nc: -nc[1]):
        sel = (labels == name) & ~is_card
        small = count < 0.1 * len(xy)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=18 if small else 4, alpha=0.9 if small else 0.5,
                   edgecolors="k" if small else "none", linewidths=0.3, label=f"{name or 'normal'} ({count})")
    if is_card.any():
        rows = np.nonzero(is_card)[0]
        ax.scatter(xy[rows, 0], xy[rows, 1], s=90, marker="*", c="gold", edgecolors="k", linewidths=0.7,
                   label=f"candidates ({len(rows)})")
        for i in rows[:50]:
            ax.annotate(str(rank_of[labels[i]]), xy[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("map 1")
    ax.set_ylabel("map 2")
    ax.set_title("latent map")
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    return _fig_png(fig)


def _hist_panels(score_hist: dict) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    panels = [("combined score", np.asarray(score_hist["scores"], float), score_hist.get("calibration"))]
    for name, entry in (score_hist.get("statistics") or {}).items():
        panels.append((str(name), np.asarray(entry["scores"], float), entry.get("calibration")))
    return panels


def _hist_figure(score_hist: dict, cards: list[Card]) -> bytes:
    panels = _hist_panels(score_hist)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for k, (ax, (name, scores, calibration)) in enumerate(zip(axes[0], panels)):
        scores = scores[np.isfinite(scores)]
        calibration = None if calibration is None else np.asarray(calibration, float)
        calibration = None if calibration is None else calibration[np.isfinite(calibration)]
        pooled = np.concatenate([scores, calibration if calibration is not None else []])
        if pooled.size == 0:
            continue
        positive = pooled.min() > 0 and pooled.max() / pooled.min() > 100
        bins = np.geomspace(pooled.min(), pooled.max(), 50) if positive else np.linspace(pooled.min(), pooled.max() + 1e-12, 50)
        ax.hist(scores, bins=bins, density=True, histtype="stepfilled", alpha=0.5, label=f"survey (n={scores.size})")
        if calibration is not None and calibration.size:
            ax.hist(calibration, bins=bins, density=True, histtype="step", lw=1.5, color="k", label=f"calibration (n={calibration.size})")
        if k == 0 and cards:
            for card in cards:
                ax.axvline(float(card.score), color="crimson", lw=0.6, alpha=0.7)
            ax.plot([], [], color="crimson", lw=0.6, label="candidates")
        if positive:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return _fig_png(fig)


def _table(cards: list[Card]) -> pd.DataFrame:
    stat_names: list[str] = []
    for card in cards:
        stat_names += [k for k in card.statistics if k not in stat_names]
    rows = []
    for rank, card in enumerate(cards, 1):
        row = {
            "rank": rank,
            "object_id": str(card.object_id),
            "ra": float(card.ra),
            "dec": float(card.dec),
            "score": float(card.score),
            "p_value": float(card.p_value),
            "q_value": float(card.q_value),
            "label": None if card.label is None else str(card.label),
            "anomaly_class": None if card.anomaly_class is None else str(card.anomaly_class),
        }
        for name in stat_names:
            row[name] = float(card.statistics.get(name, float("nan")))
        rows.append(row)
    columns = ["rank", "object_id", "ra", "dec", "score", "p_value", "q_value", "label", "anomaly_class", *stat_names]
    return pd.DataFrame(rows, columns=columns)


def _write_npz(path: Path, maps: dict[str, np.ndarray]) -> None:
    # Written by hand, not np.savez(**maps): an object id such as "file" would clash with its arguments.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in maps.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(f"{key}.npy", buffer.getvalue())


_TEMPLATES = Path(__file__).parent / "templates"


@lru_cache(maxsize=None)
def template_environment(*extra_dirs: str) -> jinja2.Environment:
    """The Jinja2 environment of gsafe's pages: autoescape on for every template, so an object id
    from a FITS header can never become markup. ``extra_dirs`` are searched first (the review app's
    templates), then ``infra/templates`` (the gallery page and its card macro)."""
    loader = jinja2.FileSystemLoader([*extra_dirs, str(_TEMPLATES)])
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=False, lstrip_blocks=False)


def panel_captions(card: Card) -> list[str]:
    """Captions of the four panels of a card, in the order of `panels` (DupLEX cards carry the
    counterfactual normal version where others carry the reconstruction)."""
    second = "counterfactual" if card.method == "duplex" else "reconstruction"
    return [_rgb_caption(tuple(card.bands), np.asarray(card.image).shape[0]), second, "residual", card.method]


def card_view(card: Card, rank: int, panel_src: list[str], neighbour_src: list[str] | None = None,
              dom_id: str | None = None, lazy: bool = False) -> dict:
    """What the card macro (``templates/card.html.j2``) shows of `card`: formatted text (escaped by
    the template) and the image sources of its panels and neighbours (data: URIs or URLs)."""
    stats = [(str(name), _fmt(value)) for name, value in card.statistics.items()]
    tags = [(kind, str(value)) for kind, value in (("class", card.anomaly_class), ("label", card.label))
            if value is not None and str(value) != ""]
    if card.more_like_this:
        tags.append(("more like this", str(int(card.more_like_this))))
    neighbours = [(str(nb_id), src) for (nb_id, _), src in zip(card.neighbours or [], neighbour_src or [])]
    return {
        "rank": rank, "dom_id": dom_id or f"card-{rank}", "object_id": str(card.object_id), "tags": tags,
        "ra": _fmt(card.ra, "deg"), "dec": _fmt(card.dec, "deg"), "score": _fmt(card.score),
        "p": _fmt(card.p_value), "q": _fmt(card.q_value), "panels": list(zip(panel_captions(card), panel_src)),
        "stats": stats, "neighbours": neighbours, "lazy": lazy,
    }


def _table_view(table: pd.DataFrame) -> dict:
    text_columns = {"object_id", "label", "anomaly_class"}
    columns = [{"key": str(col), "type": "str" if col in text_columns else "num"} for col in table.columns]
    rows = []
    for _, row in table.iterrows():
        cells = []
        for col in table.columns:
            value = row[col]
            if col == "object_id":
                cells.append({"value": str(value), "shown": str(value), "link": True})
            elif col in text_columns:
                shown = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
                cells.append({"value": shown, "shown": shown, "link": False})
            else:
                kind = "deg" if col in ("ra", "dec") else "g"
                shown = str(int(value)) if col == "rank" else _fmt(value, kind)
                cells.append({"value": repr(float(value)), "shown": shown, "link": False})
        rows.append({"rank": int(row["rank"]), "cells": cells})
    return {"columns": columns, "rows": rows}


def write_gallery(
    out_dir: str | Path,
    cards: list[Card],
    *,
    latent_xy: np.ndarray | None = None,
    latent_labels: list[str] | np.ndarray | None = None,
    score_hist: dict | None = None,
    title: str = "gsafe anomaly gallery",
    notices: list[str] | None = None,
) -> dict[str, Path]:
    """Writes the gallery of ``cards`` to ``out_dir``; returns the written paths by name.

    Arguments:
        out_dir: report folder (created).
        cards: the candidates, most anomalous first (the page then sorts by q-value).
        latent_xy: 2-D latent map ``(n, 2)`` of the survey (see ``gsafe_models.explain.latent_map``).
        latent_labels: a label per map point ``(n,)``, coloured by category (``"normal"``,
            ``"top anomaly"``, a simulated class...); a label equal to a card's object id marks that
            point as the card's star, numbered by rank.
        score_hist: ``{"scores": (N,), "calibration": (M,)}`` combined scores of the survey and of
            the calibration (normal) set, optionally ``"statistics": {name: {"scores", "calibration"}}``.
        title: page title.
        notices: lines shown in a banner above everything (e.g. a drift alarm), plain text.

    Returns:
        ``{"index", "csv", "parquet", "attributions", "latent_map"?, "score_hist"?,
        "card:<object_id>" per card}``.
    """
    out = Path(out_dir)
    (out / "cards").mkdir(parents=True, exist_ok=True)
    ids = [str(c.object_id) for c in cards]
    if len(set(ids)) != len(ids):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"write_gallery: object ids must be unique; repeated: {duplicated}")
    written: dict[str, Path] = {}
    taken: set[str] = set()
    views = []
    for rank, card in enumerate(cards, 1):
        rgb = panels(card)
        path = out / "cards" / f"{safe_filename(card.object_id, taken)}.png"
        path.write_bytes(_card_figure(card, rgb, rank))
        written[f"card:{card.object_id}"] = path
        neighbour_src = [data_uri(png(composite(nb_image, tuple(card.bands)))) for _, nb_image in card.neighbours or []]
        views.append(card_view(card, rank, [data_uri(png(p)) for p in rgb.values()], neighbour_src))

    overview = []
    if latent_xy is not None:
        figure = _latent_figure(latent_xy, latent_labels, cards)
        written["latent_map"] = out / "latent_map.png"
        written["latent_map"].write_bytes(figure)
        overview.append(("latent map", data_uri(figure)))
    if score_hist is not None:
        figure = _hist_figure(score_hist, cards)
        written["score_hist"] = out / "score_hist.png"
        written["score_hist"].write_bytes(figure)
        overview.append(("score histograms", data_uri(figure)))

    table = _table(cards)
    taken: set[str] = set()
    keys = [safe_npz_key(c.object_id, taken) for c in cards]      # the id itself unless it is unsafe as a file name
    files = table.assign(attribution_key=keys)
    written["csv"] = write_table(files, out / "candidates.csv")
    written["parquet"] = write_table(files, out / "candidates.parquet")
    written["attributions"] = out / "attributions.npz"
    _write_npz(written["attributions"], {k: np.asarray(c.attribution, dtype=np.float32) for k, c in zip(keys, cards)})

    page = template_environment().get_template("gallery.html.j2").render(
        title=title, cards=views, table=_table_view(table), overview=overview, notices=list(notices or []),
        stamp=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    written["index"] = out / "index.html"
    written["index"].write_text(page + "\n", encoding="utf-8")
    return written
