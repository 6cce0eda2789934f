"""The Captioner dashboard: a Flask app factory with three blueprints.

- `api`: JSON under `/api/v1` (APIFlask), with its OpenAPI document at `/api/openapi.json` and
  browsable docs at `/api/docs` (Swagger UI 5, which reads OpenAPI 3.1, served from the
  installed `flask-swagger-ui` package, never from a CDN);
- `ui`: server-rendered pages (Jinja) with a little vanilla JS from `dashboard/static`;
- `auth`: login/logout; API tokens and roles are checked in `dashboard.auth`.

The web process only imports `captioner` (never torch) and enqueues work by task name after
each commit, through `app.extensions["captioner"].publisher` (tests swap in a fake).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from apiflask import APIFlask
from apiflask.exceptions import HTTPError
from flask import Response, g, render_template, request, send_from_directory
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter, ValidationError

from captioner.settings import Settings, get_settings
from captioner.state.db import make_engine, make_sessionmaker
from captioner.storage import ObjectStore, open_store

log = logging.getLogger(__name__)


class Publisher:
    """Sends work to the queue by task name. Failures are logged, not raised: SQL already holds
    the work, and the sweeper re-publishes anything queued too long."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def captions(self, job_id: int, image_ids: list[int], *, interactive: bool = False) -> None:
        from captioner.tasks import publish_caption_batches

        if not image_ids:
            return
        try:
            publish_caption_batches(
                job_id, image_ids, interactive=interactive, settings=self.settings
            )
        except Exception as exc:
            if not _is_broker_error(exc):
                raise
            log.warning("could not publish job %s (%d images): %s", job_id, len(image_ids), exc)

    def task(self, name: str, *args: Any) -> None:
        from captioner.tasks import send_task

        try:
            send_task(name, *args, settings=self.settings)
        except Exception as exc:
            if not _is_broker_error(exc):
                raise
            log.warning("could not send task %s%r: %s", name, args, exc)


def _is_broker_error(exc: BaseException) -> bool:
    """Redis down or unreachable (kombu/redis errors, socket errors): the work is safe in SQL."""
    root = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError | ConnectionError) or root in ("kombu", "redis", "celery")


@dataclass
class Captioner:
    """Per-app state, in `app.extensions["captioner"]`."""

    settings: Settings
    sessionmaker: Any
    engine: Any
    publisher: Any
    _store: ObjectStore | None = field(default=None)

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(settings=self.settings)
        return self._store


class InsecureSecretKey(RuntimeError):
    """The dashboard would sign sessions with the built-in default key: refused at start."""


def create_app(settings: Settings | None = None, *, publisher: Any = None) -> APIFlask:
    """Build the dashboard for `settings` (default: the process settings). `InsecureSecretKey`
    when the session key is the built-in default (`captioner run` passes its own)."""
    settings = settings or get_settings()
    if settings.uses_default_secret_key:
        raise InsecureSecretKey(
            "refusing to start: CAPTIONER_SECRET_KEY is the built-in default; set it to a long "
            "random string (python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    app = _new_app()
    _configure(app, settings)
    _add_extensions(app, settings, publisher)
    _register_blueprints(app, settings)
    _add_request_hooks(app)
    _add_docs_assets(app)
    _add_error_handlers(app)
    return app


def _new_app() -> APIFlask:
    """The bare APIFlask app: OpenAPI document and Swagger UI paths, Flask's own error pages."""
    app = APIFlask(
        __name__,
        title="Captioner API",
        version="1",
        spec_path="/api/openapi.json",
        docs_path="/api/docs",
        docs_ui="swagger-ui",
        json_errors=False,
    )
    app.info = {
        "description": "Submit image collections, follow their progress, review and export "
        "captions. Authenticate with `Authorization: Bearer <personal API token>`."
    }
    return app


def _configure(app: APIFlask, settings: Settings) -> None:
    """Flask config: session key and cookies, upload cap, Swagger UI assets served locally;
    behind `trusted_proxy_hops` proxies, the client address and scheme they forward."""
    app.config.update(
        SECRET_KEY=settings.secret_key.get_secret_value(),
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.public_url_is_https,
        # A cookie's signature expires with the session lifetime too (`dashboard.auth` checks
        # the login time itself).
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_lifetime_hours),
        SYNC_LOCAL_SPEC=False,
        SWAGGER_UI_CSS="/api/docs/assets/swagger-ui.css",
        SWAGGER_UI_BUNDLE_JS="/api/docs/assets/swagger-ui-bundle.js",
        SWAGGER_UI_STANDALONE_PRESET_JS="/api/docs/assets/swagger-ui-standalone-preset.js",
        DOCS_FAVICON="/static/favicon.svg",
        SECURITY_SCHEMES={
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Personal API token"}
        },
    )
    # `<int:...>` in every route is a database id: numbers outside the INTEGER range every
    # backend shares answer 404 instead of overflowing the database driver (500); the OpenAPI
    # document states the range.
    app.url_map.converters["int"] = IdConverter
    app.spec_processor(lambda spec: split_import_body(document_id_ranges(spec)))
    if settings.trusted_proxy_hops:
        hops = settings.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)


def _add_extensions(app: APIFlask, settings: Settings, publisher: Any) -> None:
    """The per-app state in `app.extensions["captioner"]`: database, publisher, object store."""
    engine = make_engine(settings.database_url)
    app.extensions["captioner"] = Captioner(
        settings=settings,
        sessionmaker=make_sessionmaker(engine),
        engine=engine,
        publisher=publisher or Publisher(settings),
    )


def _register_blueprints(app: APIFlask, settings: Settings) -> None:
    """Auth (with rate limits and CSRF), /metrics and /health, the API, the pages, training."""
    from dashboard import api, auth, exports, grid, imports, ops, training, ui

    auth.init_app(app, settings)
    ops.init_app(app)  # /metrics and /health
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(imports.bp)  # caption imports
    app.register_blueprint(exports.bp)  # background exports
    app.register_blueprint(grid.bp)  # review grid, two-step bulk approval, try one image
    app.register_blueprint(ui.bp)
    app.register_blueprint(training.api_bp)  # the learning loop: models and training runs
    app.register_blueprint(training.ui_bp)


def _add_request_hooks(app: APIFlask) -> None:
    """Close the request's database session at teardown; security headers on every response."""
    app.teardown_appcontext(_close_session)
    app.after_request(_security_headers)


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith("/api/docs"):
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
            "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
        )
    return response


def _add_docs_assets(app: APIFlask) -> None:
    """Swagger UI's files (version 5: it reads the OpenAPI 3.1 document), served from the
    installed `flask-swagger-ui` package's copy of Swagger UI's dist folder (no CDN)."""

    @app.get("/api/docs/assets/<path:filename>")
    @app.doc(hide=True)
    def docs_assets(filename: str):
        import flask_swagger_ui

        return send_from_directory(Path(flask_swagger_ui.__file__).parent / "dist", filename)


def _add_error_handlers(app: APIFlask) -> None:
    """Errors as JSON `{message, detail}` under /api/, as the error page everywhere else."""
    app.register_error_handler(HTTPError, _apiflask_error)
    app.register_error_handler(HTTPException, _http_error)


def _apiflask_error(error: HTTPError):
    if _wants_json():
        return _json_error(error.status_code, error.message, error.detail, error.headers)
    return _html_error(error.status_code, error.message)


def _http_error(error: HTTPException):
    if _wants_json():
        headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
        return _json_error(error.code or 500, error.name, None, headers)
    return _html_error(error.code or 500, error.name, error.description)


def _json_error(code: int, message: str, detail: Any = None, headers=None):
    body = {"message": message, "detail": detail or {}}
    return body, code, headers or {}


def _html_error(code: int, message: str, description: str | None = None):
    return render_template("error.html", code=code, message=message, description=description), code


MIN_ID = 1
MAX_ID = 2**31 - 1  # the id columns are `Integer`: 32-bit on PostgreSQL
_MAX_ID_DIGITS = len(str(MAX_ID))


class IdConverter(IntegerConverter):
    """`int` for ids: MIN_ID .. MAX_ID. Digits outside the range raise 404 here rather than
    failing the match: a failed match on a path that a rule for another method also holds
    would answer 405 (`GET /images/<huge>/reviews` next to `POST` on the same path)."""

    def __init__(self, map, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("min", MIN_ID)
        kwargs.setdefault("max", MAX_ID)
        super().__init__(map, *args, **kwargs)

    def to_python(self, value: str) -> int:
        if len(value.lstrip("0")) > _MAX_ID_DIGITS:  # never parse thousands of digits
            raise NotFound()
        try:
            return super().to_python(value)
        except ValidationError:
            raise NotFound() from None


def split_import_body(spec: dict) -> dict:
    """`POST /api/v1/imports` takes a file as multipart and rows or COCO as JSON: state each
    content type's own shapes (APIFlask states one body for every content type)."""
    body = spec.get("paths", {}).get("/api/v1/imports", {}).get("post", {}).get("requestBody")
    if not body:
        return spec
    for content_type, media in body.get("content", {}).items():
        shapes = media.get("schema", {}).get("oneOf")
        if not shapes:
            continue
        wanted = [
            shape
            for shape in shapes
            if shape.get("$ref", "").endswith("FileIn") == (content_type == "multipart/form-data")
        ]
        media["schema"] = wanted[0] if len(wanted) == 1 else {"oneOf": wanted}
    return spec


def document_id_ranges(spec: dict) -> dict:
    """The OpenAPI document's integer path parameters (every `<int:...>`) take the ids'
    range, as `IdConverter` enforces it."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):  # a path-level `parameters` list
                continue
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                if parameter.get("in") == "path" and schema.get("type") == "integer":
                    schema.update(minimum=MIN_ID, maximum=MAX_ID)
    return spec


def _wants_json() -> bool:
    return request.path.startswith("/api/")
