"""Promote: challenger vs champion on one labelled validation store; `champion` moves only through this gate."""

from __future__ import annotations

from prefect import flow

from flows.score import run_campaign
from infra import tracking
from infra.errors import StoreError
from infra.settings import Settings
from infra.store import SurveyStore
from tasks.promote import validation_metrics_task

__all__ = ["promote_flow"]


@flow(name="promote", log_prints=False)
def promote_flow(name: str, validation_url: str, settings: dict, tolerance: float = 0.0) -> dict:
    """Score challenger and champion on the same validation store; move `champion` to the challenger only if
    it detects at least as well (AUROC ≥ champion's − tolerance) and its null p-values stay uniform."""
    s = Settings(**settings)
    tracking.configure(s)
    store = SurveyStore.open(validation_url)
    if "label" not in store.columns:
        raise StoreError(f"promote: validation store {validation_url} has no catalog/label column; "
                         f"ingest it with labels (--labels TABLE) or simulate it with `gsafe simulate --store`")
    challenger = tracking.resolve(f"{name}@challenger")
    champion_v = tracking.get_alias_version(name, "champion")
    versions = [challenger.version] + ([champion_v] if champion_v and champion_v != challenger.version else [])
    metrics = {}
    for v in versions:
        run_campaign(validation_url, name, v, s)
        metrics[v] = validation_metrics_task(validation_url, name, v)
    ch = metrics[challenger.version]
    champ = metrics.get(champion_v) if champion_v else None
    if not ch["calibrated"]:
        decision, why = "refused", f"challenger gives normal objects too many small p-values (KS D+ {ch['ks']:.3f} > {ch['ks_critical']:.3f})"
    elif champ is None:
        decision, why = "promoted", "no champion yet; challenger is calibrated"
    elif champion_v == challenger.version:
        decision, why = "unchanged", "challenger is already champion"
    elif ch["auroc"] >= champ["auroc"] - tolerance:
        decision, why = "promoted", f"AUROC {ch['auroc']:.4f} ≥ champion's {champ['auroc']:.4f}"
    else:
        decision, why = "refused", f"AUROC {ch['auroc']:.4f} < champion's {champ['auroc']:.4f}"
    if decision == "promoted":
        tracking.set_alias(name, "champion", challenger.version)
    tags = {"gsafe.promote.decision": decision, "gsafe.promote.reason": why,
            "gsafe.promote.validation": validation_url, "gsafe.promote.against": champion_v or "none"}
    tags |= {f"gsafe.promote.{k}": f"{v:.5g}" if isinstance(v, float) else v for k, v in ch.items()}
    if champ:
        tags |= {f"gsafe.promote.champion_{k}": f"{v:.5g}" if isinstance(v, float) else v for k, v in champ.items()}
    tracking.set_version_tags(name, challenger.version, tags)
    return {"decision": decision, "reason": why, "challenger": challenger.version, "champion_before": champion_v,
            "champion_after": tracking.get_alias_version(name, "champion"), "metrics": metrics}
