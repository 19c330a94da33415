"""The worklist page and its JSON endpoints (FastAPI), served by the same process as the loop.

Access needs the token: an ``Authorization: Bearer TOKEN`` header, or a session cookie set by the
login form (POST /login), so the token never travels in a URL (and so never in an access log).
Everything else answers 401. Neither the token nor the PACS credentials are ever rendered.
"""

from __future__ import annotations

import hmac
import html
import time
from pathlib import Path

from fastapi import FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from spinegrade.reporting.clinical import deweight_note
from spinegrade.serve.service import Service, study_key
from spinegrade.task import LEVEL_TITLES, Task

COOKIE = "spinegrade_session"
SEVERITY_COLOURS = ("#d9f2d9", "#ffe08a", "#f4a09c")  # Normal/Mild, Moderate, Severe
# Another task's grades, lowest to highest, spread over five steps from green to red.
GRADE_COLOURS = ("#d9f2d9", "#eef5c8", "#ffe08a", "#f9c18f", "#f4a09c")
STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:4px 8px;font-size:14px}th{background:#eee}
.graded{color:#176b17}.failed{color:#a31212}.pending,.running{color:#8a6d00}
.note{color:#555;font-size:13px;max-width:60em}img.fig{max-width:100%;border:1px solid #ccc}
.caution{color:#8a4b00;background:#fff4e0;border-left:4px solid #e0a040;padding:4px 8px}
"""


def _page(title: str, body: str) -> HTMLResponse:
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(doc)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def create_app(service: Service, token: str) -> FastAPI:
    """The FastAPI app over ``service``'s state; ``token`` guards every route but /login."""
    app = FastAPI(title="spinegrade", docs_url=None, redoc_url=None, openapi_url=None)
    model_id = service.model.model_id

    def authorised(request: Request) -> bool:
        given = request.cookies.get(COOKIE, "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if request.url.path == "/login" or authorised(request):
            return await call_next(request)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "token required"}, status_code=401)
        return _login_form(status=401)

    @app.post("/login")
    async def login(token_field: str = Form(alias="token")) -> Response:
        if not hmac.compare_digest(token_field.encode(), token.encode()):
            return _login_form(status=401, error=True)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return resp

    @app.get("/login")
    async def login_page() -> Response:
        return _login_form()

    def find(key: str):
        for row in service.state.all(model_id):
            if study_key(row.study_uid) == key:
                return row
        return None

    @app.get("/api/studies")
    async def api_studies() -> list[dict]:
        return [_summary(r) for r in service.state.all(model_id)]

    @app.get("/api/studies/{key}")
    async def api_study(key: str) -> Response:
        row = find(key)
        if row is None:
            return JSONResponse({"detail": "no such study"}, status_code=404)
        return JSONResponse({**_summary(row), "result": row.result,
                             "attempts": service.state.attempts(row.study_uid)})  # fmt: skip

    def result_file(key: str, name: str, media: str) -> Response:
        path = service.work / "results" / key / name
        if find(key) is None or not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(path, media_type=media)

    @app.get("/api/studies/{key}/figure.png")
    async def figure(key: str) -> Response:
        return result_file(key, "figure.png", "image/png")

    @app.get("/api/studies/{key}/sr.dcm")
    async def sr(key: str) -> Response:
        return result_file(key, "sr.dcm", "application/dicom")

    @app.get("/")
    async def worklist() -> HTMLResponse:
        rows = service.state.all(model_id)
        counts = {s: sum(r.status == s for r in rows) for s in ("graded", "pending", "failed")}
        head = ("<tr><th>Study</th><th>Date</th><th>Accession</th><th>Description</th>"
                "<th>Status</th><th>Updated</th><th>Model</th><th>Reason</th></tr>")  # fmt: skip
        body = "".join(_worklist_row(r) for r in rows)
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        return _page(
            "spinegrade worklist",
            f"<p>{summary}. Model {html.escape(service.model.run)} "
            f"({html.escape(service.model.model_id)}), PACS {html.escape(service.pacs.url)}.</p>"
            f"<table id='worklist'>{head}{body}</table>",
        )

    @app.get("/study/{key}")
    async def study_page(key: str) -> Response:
        row = find(key)
        if row is None:
            return _page("no such study", "<p><a href='/'>back to the worklist</a></p>")
        return _study_page(key, row, service.task)

    return app


def _login_form(status: int = 200, error: bool = False) -> HTMLResponse:
    msg = "<p class='failed'>Wrong token.</p>" if error else ""
    body = (f"{msg}<form method='post' action='/login'><label>Access token "
            "<input type='password' name='token' id='token'></label> "
            "<button type='submit' id='login'>Open</button></form>")  # fmt: skip
    resp = _page("spinegrade: access token needed", body)
    resp.status_code = status
    return resp


def _summary(row) -> dict:
    return {
        "key": study_key(row.study_uid), "study_uid": row.study_uid, "status": row.status,
        "study_date": row.info.get("study_date", ""), "accession": row.info.get("accession", ""),
        "description": row.info.get("description", ""), "updated": row.updated,
        "graded_at": row.graded_at, "attempts": row.attempts, "reason": row.reason,
        "next_try": row.next_try if row.status == "failed" else None, "model_id": row.model_id,
        "sr_series_uid": row.sr_series_uid, "sc_series_uid": row.sc_series_uid,
        "superseded": row.superseded,
    }  # fmt: skip


def _worklist_row(row) -> str:
    key = study_key(row.study_uid)
    link = f"<a href='/study/{key}'>{html.escape(key)}</a>"
    # All of it (the service keeps a reason to one line of at most 500 characters): what is wrong
    # comes after the study and series it names, past any shorter cut.
    reason = html.escape(row.reason)
    if row.status == "failed":
        reason += f" (retry after {_when(row.next_try)})"
    cells = [link, row.info.get("study_date", ""), row.info.get("accession", ""),
             row.info.get("description", "")]  # fmt: skip
    return (
        "<tr>" + "".join(f"<td>{c if i == 0 else html.escape(str(c))}</td>"
                         for i, c in enumerate(cells))
        + f"<td class='{row.status}'>{row.status}</td><td>{_when(row.updated)}</td>"
        f"<td>{html.escape(row.model_id)}</td><td>{reason}</td></tr>"
    )  # fmt: skip


def _grade_colour(task: Task, condition, g: int) -> str:
    """RSNA's three severities keep their colours; another task's grades run green to red."""
    if task.is_rsna:
        return SEVERITY_COLOURS[g]
    return GRADE_COLOURS[round(4 * g / (len(condition.grades) - 1))]


def _grade_cell(task: Task, column: str, t: dict) -> str:
    c = task.column_condition(column)
    g = c.grades.index(t["grade"])
    mark = "" if t["source"] == "model" else " (prior)"
    return (f"<td style='background:{_grade_colour(task, c, g)}' data-grade='{g}'>"
            f"{html.escape(t['grade'])} {t['clinical'][g]:.0%}{mark}</td>")  # fmt: skip


def _grade_table(task: Task, targets: dict) -> str:
    """RSNA's grid (a row per condition, a column per level, as its readers' form); another
    task reads like a radiologist's list: a row per level, a column per finding."""
    conditions = [(c.name, html.escape(c.title)) for c in task.conditions]
    levels = [(lv, LEVEL_TITLES[lv]) for lv in task.levels]
    corner, rows, cols = (
        ("Condition", conditions, levels) if task.is_rsna else ("Level", levels, conditions)
    )

    def column(r: str, c: str) -> str:  # label columns are {condition}_{level}
        return f"{r}_{c}" if task.is_rsna else f"{c}_{r}"

    head = f"<tr><th>{corner}</th>" + "".join(f"<th>{title}</th>" for _, title in cols)
    body = "".join(
        f"<tr><th>{title}</th>"
        + "".join(_grade_cell(task, column(r, c), targets[column(r, c)]) for c, _ in cols)
        + "</tr>"
        for r, title in rows
    )
    return f"<table id='grades'>{head}</tr>{body}</table>"


def _study_page(key: str, row, task: Task) -> HTMLResponse:
    if row.result is None:
        body = (f"<p>Status: <span class='{row.status}'>{row.status}</span>. "
                f"{html.escape(row.reason)}</p>")  # fmt: skip
        return _page(f"Study {key}", body + "<p><a href='/'>worklist</a></p>")
    model = row.result["model"]
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in row.result.get("warnings", []))
    # e.g. a phantom-trained run's caution, above the grades it qualifies
    notes = "".join(f"<p class='caution'>{html.escape(n)}</p>" for n in model.get("notes", []))
    body = (
        f"<p>Graded {_when(row.graded_at)} by {html.escape(model['run'])} (folds "
        f"{html.escape(','.join(map(str, model['folds'])))}, "
        f"model {html.escape(model['model_id'])}, spinegrade {html.escape(model['version'])}). "
        f"<a href='/api/studies/{key}/sr.dcm' id='sr-link'>DICOM SR</a> · "
        f"<a href='/'>worklist</a></p>{notes}"
        f"{_grade_table(task, row.result['targets'])}"
        f"<p class='note'>{html.escape(row.result.get('note') or deweight_note(task))}</p>"
        + (f"<ul class='note'>{warn}</ul>" if warn else "")
        + f"<p><img class='fig' src='/api/studies/{key}/figure.png' alt='report figure'></p>"
    )
    return _page(f"Study {key}", body)


def serve(run_dir: Path | str, cfg) -> None:
    """Run the loop in a thread and the page in this one, until interrupted."""
    import threading

    import uvicorn

    service = Service(run_dir, cfg)
    worker = threading.Thread(target=service.run_forever, name="spinegrade-loop", daemon=True)
    worker.start()
    try:
        # access_log off: request lines are not needed and a URL must never carry a secret anyway
        uvicorn.run(create_app(service, cfg.token), host=cfg.host, port=cfg.port,
                    access_log=False, log_level="warning")  # fmt: skip
    finally:
        service.stop_event.set()
        worker.join(timeout=60)
