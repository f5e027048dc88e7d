"""The scientist in the loop, end to end: `gsafe review` in real headless Chromium (labels by keyboard,
persisted, re-ranked, hostile ids inert), and a hunt afterwards that lists known-artefact groups apart.

Real parts only: a simulated store scored by the session's trained model, the `gsafe review` command
as a subprocess serving on 127.0.0.1, Selenium driving Debian's chromium through chromedriver,
MLflow on SQLite, a Prefect hunt flow ingesting new FITS cutouts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from infra.store import SurveyStore

pytestmark = pytest.mark.slow

CLASSES = ("saturated_star", "lens")   # one instrumental class to suppress, one astrophysical to like
HOSTILE = ["<img src=x onerror=\"window.__pwned=1\">", "<script>window.__pwned=2</script>"]


@pytest.fixture(scope="module")
def scored(trained, settings, tmp_path_factory) -> dict:
    """A survey of galaxies, saturated stars and lenses (two with hostile ids), scored by 'tiny'."""
    from flows.score import run_campaign
    from tasks.simulate import simulate_survey

    url = str(tmp_path_factory.mktemp("review") / "survey.zarr")
    simulate_survey(320, settings=settings, seed=11, anomaly_frac=0.25, store=url, classes=CLASSES, workers=2)
    store = SurveyStore.open(url, mode="r+")
    cat = store.read_catalog(["anomaly_class"])
    donors = np.nonzero(cat["anomaly_class"] == "saturated_star")[0][:2]
    store.append(store.read_rows(donors), {"object_id": np.array(HOSTILE, dtype=object),
                                           "anomaly_class": np.array(["saturated_star"] * 2, dtype=object),
                                           "label": np.array([1, 1])})
    run_campaign(url, "tiny", trained["version"], settings)
    # the browser test labels `url` itself; tests that need the scored survey before any label copy this
    pristine = str(Path(url).with_name("pristine.zarr"))
    shutil.copytree(url, pristine)
    return {"url": url, "pristine": pristine, "version": trained["version"]}


def _chromedriver():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium / chromium-driver not installed (make browser, or apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    return chromium, driver


@pytest.fixture
def review_server(scored, settings, tmp_path):
    """`gsafe review` as a user starts it; yields (url, process, export dir)."""
    env = os.environ | {"GSAFE_HOME": str(settings.home), "GSAFE_PROGRESS": "false"}
    out = tmp_path / "exports"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "review", "--store", scored["url"], "--model",
                             f"tiny/{scored['version']}", "--port", "0", "--pool", "120", "--who", "tester",
                             "--out", str(out), "--method", "residual"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url, deadline = None, time.time() + 240
    while time.time() < deadline and url is None:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"gsafe review exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if "review: open " in line:
            url = line.split("review: open ", 1)[1].split()[0]
    assert url and url.startswith("http://127.0.0.1:"), "gsafe review printed no URL"
    yield url, proc, out
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _chromedriver()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def _ready(browser, timeout: float = 120) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda b: b.find_element("tag name", "body").get_attribute("data-ready"))
    return int(browser.find_element("tag name", "body").get_attribute("data-ready"))


def test_review_by_keyboard_persists_reranks_and_keeps_hostile_ids_inert(review_server, scored, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from infra import labels as lab

    url, proc, out = review_server
    before = _get(url + "api/order?n=200")["order"]
    browser = _browser(tmp_path)
    try:
        # the console check must be able to fail
        browser.get(url)
        n_cards = _ready(browser)
        assert n_cards >= 12
        browser.execute_script("console.error('probe')")
        assert any("probe" in e["message"] for e in browser.get_log("browser"))

        # hostile ids (the two most anomalous objects): each on a page of its own, shown as text, never run
        for h in HOSTILE:
            assert h in before, "hostile ids must be candidates for this check"
            browser.get(url + f"?start={before.index(h)}")
            _ready(browser)
            assert h in browser.find_element("css selector", "#cards .card h3").text
            assert h not in browser.page_source
            assert browser.execute_script("return window.__pwned === undefined")

        browser.get(url)
        _ready(browser)
        body = browser.find_element("tag name", "body")
        keys = ActionChains(browser)
        # ten labels, by keyboard only: relevance digits, a tag typed after `t`, one group suppression
        plan = ["3i", "i", "n", "n", "a", "ti", "i", "n", "a", "A"]
        for step in plan:
            if step.startswith("t"):
                keys.send_keys("t").send_keys("ring-like").send_keys(Keys.ENTER).send_keys(step[1:])
            else:
                keys.send_keys(step)
        keys.perform()
        WebDriverWait(browser, 120).until(lambda b: body.get_attribute("data-saved") == "10")
        assert "error" not in (browser.find_element("id", "status").get_attribute("class") or "")

        browser.refresh()
        _ready(browser)
        labelled_on_page = int(browser.find_element("id", "n-labelled").text)
        assert labelled_on_page >= 10
        assert any(e.get_attribute("data-i") for e in browser.find_elements("css selector", "#cards .card"))

        assert browser.execute_script("return window.__pwned === undefined")

        # one-at-a-time view by keyboard
        ActionChains(browser).send_keys("v").perform()
        shown = [c for c in browser.find_elements("css selector", "#cards .card") if c.is_displayed()]
        assert len(shown) == 1 and "one" in browser.find_element("tag name", "body").get_attribute("class")

        # export by keyboard: CSV + Parquet + an MLflow run
        ActionChains(browser).send_keys("e").perform()
        WebDriverWait(browser, 120).until(lambda b: "exported" in b.find_element("id", "status").text)

        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
    finally:
        browser.quit()

    # persisted in the store, with who and the model version
    store = SurveyStore.open(scored["url"])
    rows = lab.read_labels(store)
    direct = rows[rows["scope"] == "object"]
    assert len(direct) == 10
    assert set(direct["who"]) == {"tester"} and set(direct["model"]) == {f"tiny/{scored['version']}"}
    assert (direct["relevance"] == 3).sum() == 1 and (direct["tag"] == "ring-like").sum() == 1
    assert sorted(direct["label"].value_counts().to_dict().items()) == [("artefact", 3), ("interesting", 4),
                                                                       ("not_interesting", 3)]
    # the order changed beyond losing what was labelled: the rest is re-ranked by the labels
    after = _get(url + "api/order?n=200")["order"]
    gone = set(rows["object_id"])
    assert not gone & set(after)
    kept_before = [o for o in before if o not in gone]
    kept_after = [o for o in after if o in set(kept_before)]
    assert kept_after != kept_before[:len(kept_after)]
    assert {p.name for p in out.iterdir()} >= {"labels.csv", "labels.parquet", "labels_latest.csv", "labels_latest.parquet"}

    # writes need the page's token
    req = urllib.request.Request(url + "api/label", data=json.dumps({"i": 0, "label": "interesting"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 403
    assert len(lab.read_labels(SurveyStore.open(scored["url"]))) == len(rows)


def test_hunt_after_labelling_lists_known_artefact_groups_apart(scored, settings, sdict, flows_ctx, tmp_path):
    import pandas as pd

    from flows.hunt import hunt_flow
    from infra import labels as lab
    from infra import tracking
    from review.session import ReviewSession
    from tasks.score import load_detector
    from tasks.simulate import simulate_survey

    url = str(tmp_path / "hunted.zarr")
    shutil.copytree(scored["pristine"], url)  # not scored["url"]: the browser test labels that one
    v = scored["version"]
    det = load_detector(tracking.download_detector(tracking.ModelRef("tiny", v)))
    session = ReviewSession(url, "tiny", v, det, settings, "tester", tmp_path / "exports", pool_size=120)
    cls = session.pool.catalog["anomaly_class"].astype(str)
    # the scientist suppresses the group with most saturated stars (from its best member) and likes lenses
    stars = session.groups[cls == "saturated_star"]
    biggest = np.bincount(stars).argmax()
    star = int(np.nonzero(session.groups == biggest)[0][0])
    suppressed = session.label(star, "artefact", tag="bleed trail", group=True)["suppressed"]
    lens = np.nonzero(cls == "lens")[0]
    for i in lens[:3]:
        session.label(int(i), "interesting")
    assert suppressed >= 1, "the star's group had no other member: premise of the test broken"
    group = session.groups == session.groups[star]
    assert (cls[group] == "saturated_star").mean() >= 0.5, "the suppressed group is not mostly stars"

    new = tmp_path / "new"
    simulate_survey(160, settings=settings, seed=12, anomaly_frac=0.3, fits_dir=str(new), classes=CLASSES, workers=2)
    r = hunt_flow(url, f"tiny/{v}", sdict, source=str(new), out=str(tmp_path / "hunt"), alpha=0.2, top_k=8)
    assert r["new"] == 160
    apart = pd.read_csv(tmp_path / "hunt" / "known_artefacts.csv")
    cand = pd.read_csv(tmp_path / "hunt" / "candidates.csv")
    assert len(apart) >= 1 and not set(apart["object_id"]) & set(cand["object_id"])
    truth = dict(zip(SurveyStore.open(url).object_ids().astype(str),
                     SurveyStore.open(url).read_catalog(["anomaly_class"])["anomaly_class"].astype(str)))
    kinds = apart["object_id"].map(truth)
    assert (kinds == "saturated_star").mean() >= 0.8, kinds.value_counts().to_dict()
    assert "like_interesting" in cand.columns
    # versioned with the detector: the relevance state the hunt applied is in MLflow
    latest = lab.latest_labels(SurveyStore.open(url))
    assert tracking.find_relevance(url, settings, "tiny", v, lab.labels_digest(latest)) is not None
    assert r["known_artefacts"] == len(apart)

    # the gallery (explain without rows) shows the review's order: no labelled or suppressed object,
    # representatives first with their "n more like this"
    from flows.explain import explain_flow

    from tasks.review import diverse_rows_task

    # as many cards as it takes to reach the first representative of a group (the review's order)
    _, more = diverse_rows_task.fn(url, "tiny", v, 24, tracking.download_detector(tracking.ModelRef("tiny", v)))
    assert any(more), "no group among the first 24 candidates: premise of the test broken"
    k = max(6, next(j for j, m in enumerate(more) if m) + 1)
    g = explain_flow(url, "tiny", v, k, str(tmp_path / "gallery"), sdict, method="residual")
    shown = pd.read_csv(Path(g["files"]["csv"]))["object_id"].astype(str)
    assert len(shown) == k and not set(shown) & set(latest["object_id"])
    page = Path(g["index"]).read_text(encoding="utf-8")
    assert all(f"more like this: {m}" in page for m in more[:k] if m)


def test_a_review_restricted_to_some_rows_offers_only_them_and_says_so(scored, settings, tmp_path):
    """`gsafe review --calibration` builds its session on a subset of rows (the model's calibration objects):
    the pool holds only those, most anomalous first, and the page says what it is reviewing."""
    from fastapi.testclient import TestClient

    from infra import tracking
    from review.app import create_app
    from review.session import ReviewSession
    from tasks.score import load_detector

    url = str(tmp_path / "subset.zarr")
    shutil.copytree(scored["pristine"], url)
    v = scored["version"]
    det = load_detector(tracking.download_detector(tracking.ModelRef("tiny", v)))
    table = SurveyStore.open(url).score_table("tiny", v)
    p = table.read(["p_value"], 0, table.n)["p_value"]
    rows = np.arange(0, table.n, 3)
    pages = {}
    for within in (rows, None):
        session = ReviewSession(url, "tiny", v, det, settings, "tester", tmp_path / "exports", pool_size=30, within=within)
        chosen = rows if within is not None else np.arange(table.n)
        assert len(session.pool.rows) == 30 and set(session.pool.rows) <= set(chosen)
        assert p[session.pool.rows].max() <= np.delete(p, np.r_[session.pool.rows, np.setdiff1d(np.arange(table.n), chosen)]).min()
        with TestClient(create_app(session), base_url="http://127.0.0.1") as client:
            page = client.get("/")
        assert page.status_code == 200
        pages[within is None] = page.text
    assert "calibration objects" in pages[False] and "calibration objects" not in pages[True]
