"""The anomaly gallery: files, escaping of hostile ids, self-containment, and a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from infra.gallery import Card, composite, safe_filename, write_gallery

HOSTILE = "<script>alert(1)</script>"
BANDS = ("g", "r", "i", "z", "y")


def _cards(k: int, seed: int = 0) -> list[Card]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    galaxy = 50 * np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 18.0)
    ids = [HOSTILE, "obj 7/../../etc & \"quoted\"", *[f"obj_{i:04d}" for i in range(k - 2)]][:k]
    cards = []
    for i, object_id in enumerate(ids):
        image = (galaxy * rng.uniform(0.5, 2, size=(5, 1, 1)) + rng.normal(0, 2, size=(5, 32, 32))).astype(np.float32)
        image[0, :2, :2] = np.nan  # a missing corner must not break any panel
        reconstruction = (galaxy * np.ones((5, 1, 1))).astype(np.float32)
        cards.append(
            Card(
                object_id=object_id,
                ra=150.0 + i / 100,
                dec=2.0 - i / 100,
                score=float(100 - i),
                p_value=1e-4 * (i + 1),
                q_value=[0.03, 0.001, 0.02, float("nan"), 0.005, 0.01][i % 6],
                statistics={"residual": float(rng.normal()), "latent_nll": float(rng.normal())},
                image=image,
                reconstruction=reconstruction,
                residual=image - reconstruction,
                attribution=rng.normal(size=(5, 32, 32)) if i % 2 else rng.random((32, 32)),
                bands=BANDS,
                anomaly_class="lens" if i % 2 else None,
                label=i % 2,
                neighbours=[(f"normal_{j}", reconstruction) for j in range(2)] if i < 2 else None,
                method="integrated gradients",
            )
        )
    return cards


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, dict[str, Path], list[Card]]:
    out = tmp_path_factory.mktemp("report")
    cards = _cards(5)
    rng = np.random.default_rng(1)
    n = 40
    labels = ["normal"] * (n - len(cards)) + [c.object_id for c in cards]
    written = write_gallery(
        out,
        cards,
        latent_xy=rng.normal(size=(n, 2)),
        latent_labels=labels,
        score_hist={
            "scores": rng.gamma(2.0, size=500),
            "calibration": rng.gamma(2.0, size=200),
            "statistics": {"residual": {"scores": rng.normal(size=300), "calibration": rng.normal(size=100)}},
        },
    )
    return out, written, cards


def test_write_gallery_writes_every_file(gallery):
    out, written, cards = gallery
    for name in ("index.html", "latent_map.png", "score_hist.png", "candidates.csv", "candidates.parquet", "attributions.npz"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    pngs = sorted((out / "cards").glob("*.png"))
    assert len(pngs) == len(cards)
    assert all(written[f"card:{c.object_id}"].parent == out / "cards" for c in cards)
    assert written["index"] == out / "index.html"


def test_hostile_object_ids_are_escaped_and_sanitized(gallery):
    out, written, _ = gallery
    page = (out / "index.html").read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own sorter
    assert '"quoted"' not in page
    for path in (out / "cards").iterdir():
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.png", path.name), path.name
        assert path.resolve().parent == (out / "cards").resolve()


def test_page_is_self_contained(gallery):
    out, _, cards = gallery
    page = (out / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") or s.startswith("#") for s in sources)
    assert "http://" not in page and "https://" not in page
    assert page.count('<article class="card"') == len(cards)


def test_attributions_npz_is_keyed_by_object_id_or_its_safe_key(gallery):
    out, _, cards = gallery
    table = pd.read_parquet(out / "candidates.parquet")
    key = dict(zip(table["object_id"], table["attribution_key"]))
    with np.load(out / "attributions.npz") as maps:
        assert sorted(maps.files) == sorted(key.values())
        for card in cards:
            safe = all(ch.isalnum() or ch in "._-" for ch in card.object_id)
            assert (key[card.object_id] == card.object_id) == safe      # a hostile id never names a member
            np.testing.assert_allclose(maps[key[card.object_id]], np.asarray(card.attribution, np.float32))


def test_candidate_table_in_csv_and_parquet(gallery):
    out, _, cards = gallery
    csv = pd.read_csv(out / "candidates.csv", keep_default_na=False, na_values=["nan", ""])
    parquet = pd.read_parquet(out / "candidates.parquet")
    for table in (csv, parquet):
        assert list(table["object_id"].astype(str)) == [c.object_id for c in cards]
        assert {"object_id", "ra", "dec", "score", "p_value", "q_value", "residual", "latent_nll"} <= set(table.columns)
    np.testing.assert_allclose(parquet["q_value"], [c.q_value for c in cards])


def test_notices_are_shown_in_a_banner_as_plain_text(tmp_path):
    cards = _cards(2)
    cards[1].more_like_this = 7
    written = write_gallery(tmp_path, cards, notices=["drift: 3 of 5 statistics moved", HOSTILE], title=HOSTILE)
    page = written["index"].read_text(encoding="utf-8")
    banner = re.search(r'<section class="notices" role="alert">(.*?)</section>', page).group(1)
    assert "drift: 3 of 5 statistics moved" in banner and "&lt;script&gt;alert(1)&lt;/script&gt;" in banner
    assert HOSTILE not in page and page.count("<script>") == 1
    assert page.count('<span class="tag">more like this: 7</span>') == 1
    assert '<section class="notices"' not in write_gallery(tmp_path / "quiet", _cards(2))["index"].read_text()


def test_repeated_object_ids_are_refused(tmp_path):
    cards = _cards(3)
    cards[2].object_id = cards[1].object_id
    with pytest.raises(ValueError, match="unique"):
        write_gallery(tmp_path, cards)


def test_safe_filenames_are_unique_and_plain():
    taken: set[str] = set()
    names = [safe_filename(s, taken) for s in ["a/b", "a_b", "a?b", "A_B", "..", "a_b"]]
    assert len({n.lower() for n in names}) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and not n.startswith(".") for n in names)


def test_composite_uses_i_r_g_and_shares_the_reference_scale():
    image = np.zeros((5, 8, 8))
    image[BANDS.index("i"), 4, 4] = 100.0  # only the i band is bright: the composite is red there
    rgb = composite(image, BANDS)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[4, 4, 0] > 0 and rgb[4, 4, 1] == 0 and rgb[4, 4, 2] == 0
    faint = composite(image / 10, BANDS, reference=image)
    assert faint[4, 4, 0] < rgb[4, 4, 0]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def _render(page: Path, profile: Path, *extra: str) -> tuple[str, list[str]]:
    """Returns (dumped DOM, console lines) of `page` in headless Chromium."""
    run = subprocess.run(
        [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return run.stdout, console


@pytest.mark.browser
def test_gallery_renders_in_chromium_without_console_errors(gallery, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, _, cards = gallery
    # The log check must be able to fail: a broken page shows up in the console lines.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>notDefined();</script></body></html>")
    _, console = _render(broken, tmp_path / "profile-broken", "--dump-dom")
    assert any("Uncaught" in line for line in console)

    dom, console = _render(out / "index.html", tmp_path / "profile", "--dump-dom")
    assert console == []  # no script error, no console.error, no blocked (external) request
    assert dom.count('<article class="card"') == len(cards)
    assert f'data-ready="{len(cards)}"' in dom  # the page's script ran to its end
    # the sorter ordered the table by q-value on load, NaN last
    ranks = re.findall(r'<tr data-card="card-(\d+)"', dom)
    q = [cards[int(r) - 1].q_value for r in ranks]
    assert q[:-1] == sorted(q[:-1]) and np.isnan(q[-1])
    shot = tmp_path / "gallery.png"
    _render(out / "index.html", tmp_path / "profile-shot", "--window-size=1400,2000", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000
