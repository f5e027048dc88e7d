"""The review web app: FastAPI routes over a `ReviewSession`, pages from Jinja2 templates (autoescape).

Served on 127.0.0.1 only. Requests must name that host (no DNS rebinding), every write carries the
page's session token in a header (a page from another site cannot label), and the Content Security
Policy allows only this origin's script, style and images: nothing in an object id can run.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from fastapi import FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from infra.gallery import template_environment
from review.session import ReviewSession

__all__ = ["create_app", "SHORTCUTS"]

log = logging.getLogger("gsafe.review")
HERE = Path(__file__).parent
PAGE = 24   # cards on one page
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# (keys, what they do): shown on the page, and the one source of truth for the script's help
SHORTCUTS = [
    ("j / → / ↓", "next candidate"),
    ("k / ← / ↑", "previous candidate"),
    ("i", "label interesting"),
    ("n", "label not interesting"),
    ("a", "label artefact"),
    ("Shift+A", "label artefact and suppress its whole group (its “n more like this”)"),
    ("0 – 5", "relevance (Astronomaly's scale) sent with the next label"),
    ("t", "type a tag for the current candidate (Enter or Esc returns)"),
    ("v", "switch between grid and one-at-a-time"),
    ("r", "reload: the next order, re-ranked by your labels"),
    ("e", "export labels (CSV, Parquet) and log them to MLflow"),
    ("?", "show or hide this help"),
]


class LabelIn(BaseModel):
    i: int = Field(ge=0)
    label: str
    tag: str = Field("", max_length=200)
    relevance: float | None = Field(None, ge=0, le=5)
    group: bool = False


def create_app(session: ReviewSession, token: str | None = None) -> FastAPI:
    """The app of one review session; `token` (default: random) guards every write."""
    token = token or secrets.token_urlsafe(16)
    app = FastAPI(title="gsafe review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])
    env = template_environment(str(HERE / "templates"))

    @app.get("/static/gallery.css")
    def gallery_css() -> Response:   # the gallery's own style, so review cards look like the gallery's
        return Response(env.loader.get_source(env, "gallery.css")[0], media_type="text/css")

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = response.headers.get("Cache-Control", "no-store")
        return response

    def check(x_gsafe_token: str | None) -> JSONResponse | None:
        if not x_gsafe_token or not secrets.compare_digest(x_gsafe_token, token):
            return JSONResponse({"error": "review: this request lacks the page's session token; reload the page"},
                                status_code=403)
        return None

    @app.get("/", response_class=HTMLResponse)
    def page(view: str = "grid", start: int = 0) -> HTMLResponse:
        plan = session.plan()
        start = max(0, min(int(start), max(len(plan.order) - 1, 0)))
        shown = plan.order[start:start + PAGE]
        cards = [session.card_stub(int(i), start + r + 1, plan.more_like_this[i] if plan.first_pass[start + r] else 0)
                 for r, i in enumerate(shown)]
        known = [session.pool.ids[int(i)] for i in plan.known_artefacts[:200]]
        html = env.get_template("review.html.j2").render(
            title=f"gsafe review — {session.model} on {session.store_url}"
                  + (" — the model's calibration objects" if session.restricted else ""), cards=cards, token=token,
            view="one" if view == "one" else "grid", shortcuts=SHORTCUTS, n_pool=len(session.pool.ids),
            n_open=len(plan.order), n_labelled=int(plan.labelled.sum()), n_known=len(plan.known_artefacts),
            known=known, n_first=int(plan.first_pass.sum()), who=session.who, start=start, page=PAGE,
            n_listed=int((session.pool.q_value <= 0.1).sum()))
        return HTMLResponse(html)

    @app.get("/img/{i}/{panel}.png")
    def image(i: int, panel: str) -> Response:
        try:
            data = session.image(i, panel)
        except KeyError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except Exception as e:  # noqa: BLE001 - one line in the server log, a 500 to the page
            log.error("review: image %s of candidate %d failed: %s: %s", panel, i, type(e).__name__, e)
            return JSONResponse({"error": f"review: image failed ({type(e).__name__})"}, status_code=500)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response((HERE / "static" / "favicon.png").read_bytes(), media_type="image/png")

    @app.get("/api/order")
    def order(n: int = 100) -> dict:
        plan = session.plan()
        ids = session.pool.ids
        return {"order": [str(ids[i]) for i in plan.order[:n]], "first_pass": plan.first_pass[:n].tolist(),
                "labelled": int(plan.labelled.sum()), "known_artefacts": [str(ids[i]) for i in plan.known_artefacts]}

    @app.post("/api/label")
    def label(body: LabelIn, x_gsafe_token: str | None = Header(None)) -> JSONResponse:
        denied = check(x_gsafe_token)
        if denied:
            return denied
        try:
            out = session.label(body.i, body.label, tag=body.tag, relevance=body.relevance, group=body.group)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001 - the scientist gets a sentence, the log one line
            log.error("review: label failed: %s: %s", type(e).__name__, e)
            return JSONResponse({"error": f"review: the label was not saved ({type(e).__name__}: {e})"}, status_code=500)
        return JSONResponse({"ok": True} | out)

    @app.post("/api/export")
    def export(x_gsafe_token: str | None = Header(None)) -> JSONResponse:
        denied = check(x_gsafe_token)
        if denied:
            return denied
        try:
            out = session.export()
        except Exception as e:  # noqa: BLE001
            log.error("review: export failed: %s: %s", type(e).__name__, e)
            return JSONResponse({"error": f"review: export failed ({type(e).__name__}: {e})"}, status_code=500)
        return JSONResponse({"ok": True} | out)

    return app
