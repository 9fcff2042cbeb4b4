"""flask-smorest wiring: the JSON body parser, the documented error envelope, and the
Swagger UI / ReDoc pages served with assets from installed packages (no CDN)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
from pathlib import Path
from typing import Any, NoReturn

import flask_smorest
import marshmallow as ma
from flask import Blueprint as FlaskBlueprint
from flask import Flask, Request, current_app, request, send_file, send_from_directory
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from . import bodies, speedups
from .errors import NotFound, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from .schemas import ErrorSchema, Password
from .version import __version__

BEARER: list[dict[str, list[str]]] = [{"bearerAuth": []}]


class JSONBodyParser(FlaskParser):
    """webargs parser whose failures are the contract's 400/415 envelopes.

    A body must be a JSON object sent as `application/json`. An endpoint whose schema has
    no required field (logout) may also be called with no body at all.
    """

    DEFAULT_VALIDATION_STATUS = 400

    def load_json(self, req: Request, schema: ma.Schema) -> Any:
        raw = req.get_data(cache=True)  # over MAX_CONTENT_LENGTH: 413 from Werkzeug
        body_optional = not any(f.required for f in schema.fields.values())
        if not is_json_request(req):
            if not raw and body_optional:
                return core.missing
            raise UnsupportedMediaType()
        if not raw.strip():
            if body_optional:
                return core.missing
            raise ValidationFailed(errors={"_body": ["A JSON object is required."]})
        try:
            data = core.parse_json(raw)
        except ValueError:  # JSONDecodeError, including bytes that are not UTF-8
            raise ValidationFailed(errors={"_body": ["Malformed JSON."]}) from None
        except RecursionError:  # "[[[[..." nested deeper than the parser can follow
            raise ValidationFailed(errors={"_body": ["The JSON body is nested too deeply."]}) from None
        if not isinstance(data, dict):
            raise ValidationFailed(errors={"_body": ["The body must be a JSON object."]})
        return data

    def handle_error(self, error: ma.ValidationError, req: Request, schema: ma.Schema, **kwargs: Any) -> NoReturn:
        messages = error.messages
        if isinstance(messages, dict) and set(messages) == {"json"}:
            messages = messages["json"]
        if not isinstance(messages, dict):
            messages = {"_body": messages}
        if "_schema" in messages:
            messages["_body"] = messages.pop("_schema")
        raise ValidationFailed(errors=messages)


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint whose documentation-only decorators (`doc`,
    `alt_response`, and `response` for a view that writes its own answer) leave no wrapper
    behind in the view (speedups.documentation_only)."""

    ARGUMENTS_PARSER = JSONBodyParser()

    def written_response(self, *args: Any, **kwargs: Any) -> Any:
        """`response` for a view that always returns a `Response` it wrote itself
        (speedups.json_response): flask-smorest passes such an answer through untouched, so
        its schema and status only document the operation, as here, with no wrapper."""
        return speedups.documentation_only(super().response(*args, **kwargs))

    def doc(self, **kwargs: Any) -> Any:
        return speedups.documentation_only(super().doc(**kwargs))

    def alt_response(self, *args: Any, **kwargs: Any) -> Any:
        return speedups.documentation_only(super().alt_response(*args, **kwargs))


class Api(flask_smorest.Api):
    ERROR_SCHEMA = ErrorSchema
    # Each operation lists the error statuses it can answer; no catch-all "default".
    DEFAULT_ERROR_RESPONSE_NAME = None

    def _register_error_handlers(self) -> None:
        """The app's own handlers (errors.init_app) answer every error."""

    def _register_pagination_header(self) -> None:
        """No endpoint paginates: no X-Pagination header, no PaginationMetadata schema."""


def _package_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


_STATIC = Path(__file__).resolve().parent / "static"

# The Swagger UI page (templates/swagger_ui.html) loads {url}swagger-ui.css, -bundle.js,
# -standalone-preset.js and our initializer; ReDoc's page loads redoc.standalone.js.
ASSETS = {
    "swagger-ui.css": lambda: _package_dir("flask_openapi3_swagger", "templates/swagger/css"),
    "swagger-ui-bundle.js": lambda: _package_dir("flask_openapi3_swagger", "templates/swagger/js"),
    "swagger-ui-standalone-preset.js": lambda: _package_dir("flask_openapi3_swagger", "templates/swagger/js"),
    "swagger-initializer.js": lambda: _STATIC,
    "redoc.standalone.js": lambda: _package_dir("flask_openapi3_redoc", "templates/redoc/js"),
}

# ReDoc's side menu shows Redocly's logo from Redocly's CDN, and no option turns it off. The
# docs pages must need nothing from outside, so the bundle is served with an empty src
# there: the image fails at once, with no request, and ReDoc drops it (its own onError).
REDOC_CDN_LOGO = (b'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"', b'src:""')

assets = FlaskBlueprint("docs_assets", __name__, url_prefix="/docs-assets")


@functools.cache
def _redoc_bundle(path: Path) -> tuple[bytes, str]:
    body = path.read_bytes().replace(*REDOC_CDN_LOGO)
    return body, hashlib.sha256(body).hexdigest()[:32]


@assets.get("/<name>")
def asset(name: str):
    if name not in ASSETS:
        raise NotFound()
    if name == "redoc.standalone.js":
        body, etag = _redoc_bundle(ASSETS[name]() / name)
        return send_file(io.BytesIO(body), mimetype="text/javascript", max_age=86400, etag=etag)
    return send_from_directory(ASSETS[name](), name, max_age=86400)


def openapi_config() -> dict[str, Any]:
    return {
        "API_TITLE": "authapp",
        "API_VERSION": version(),
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        "OPENAPI_SWAGGER_UI_URL": "/docs-assets/",
        "OPENAPI_REDOC_PATH": "redoc",
        "OPENAPI_REDOC_URL": "/docs-assets/redoc.standalone.js",
    }


def version() -> str:
    return __version__


def check_body() -> None:
    """Every body, read or not: at most MAX_CONTENT_LENGTH (413), JSON when present (415).

    Endpoints that parse a body get the same answers from the parser; this covers the
    ones that take none (logout-all, GET, DELETE), so a body there is refused the same way.
    """
    if not request.environ.get("CONTENT_LENGTH"):  # no body: what most requests send
        return
    length = request.content_length
    if length is None or length == 0:
        return
    if length > current_app.config["MAX_CONTENT_LENGTH"]:
        raise PayloadTooLarge()
    if not is_json_request(request):
        raise UnsupportedMediaType()


def init_app(app: Flask, api: Api) -> None:
    bodies.init_app(app)  # a chunked body gets its length before check_body sees it
    app.before_request(check_body)
    for key, value in openapi_config().items():
        app.config.setdefault(key, value)
    api.init_app(
        app,
        spec_kwargs={
            "components": {
                "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
            }
        },
    )
    app.register_blueprint(assets)
    min_length = app.config["PASSWORD_MIN_LENGTH"]

    def new_password_rules(converter: Any, field: ma.fields.Field, **kwargs: Any) -> dict[str, Any]:
        """A password being chosen: at least PASSWORD_MIN_LENGTH characters, as configured."""
        return {"minLength": min_length} if isinstance(field, Password) and field.new else {}

    api.ma_plugin.converter.add_attribute_function(new_password_rules)
