"""Metrics of one campaign on a labelled validation store, for the promotion gate."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from gsafe_models.metrics import auroc, average_precision, realised_fdr
from gsafe_models.uniformity import calibration_ks  # the one-sided KS check, shared with the hunt's drift alarm
from infra.store import SurveyStore
from tasks.score import null_calibration_size

__all__ = ["validation_metrics_task"]


@task(name="validation-metrics", cache_policy=NO_CACHE)
def validation_metrics_task(store_url: str, name: str, version: int, alpha: float = 0.1) -> dict:
    """AUROC, AP, realised FDR at `alpha` and the calibration check (one-sided KS of the normal
    objects' p-values) of campaign `name`/`version` on a store with a `label` column."""
    n_calib = null_calibration_size(name, version)
    store = SurveyStore.open(store_url)
    cat = store.read_catalog(["label"])
    cols = store.score_table(name, version).read(["score", "p_value", "q_value"])
    y = cat["label"]
    keep = y >= 0
    ks, crit = calibration_ks(cols["p_value"][keep & (y == 0)], n_calib)
    fdr, n_disc = realised_fdr(cols["q_value"][keep], y[keep], alpha)
    return {"auroc": auroc(cols["score"][keep], y[keep]), "ap": average_precision(cols["score"][keep], y[keep]),
            "ks": ks, "ks_critical": crit, "calibrated": bool(ks <= crit), "fdr": fdr, "discoveries": n_disc}
