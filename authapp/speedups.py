"""Speed-ups of library code on the hot path, in one place, each with a switch.

Each one does what a library already does, for less work per request, and is measured by
`bench/instructions.py` (instructions per request under callgrind). The setting SPEEDUPS
turns them on ("all", the default), off ("none"), or names the ones to use
(comma-separated). Each is tested to be installed and to agree with what it replaces
(tests/test_speedups.py); one that cannot install (another release of the library than
it was written for) logs a warning and leaves the library's own code in place.

- `sync_callables`: Flask passes every view and request hook through `Flask.ensure_sync`
  on every request, which asks `inspect.iscoroutinefunction` each time: nine times for a
  GET /health/live, a measurable part of a cheap request. Flask documents this method as
  the one to override; the answer is remembered per callable, per app.
- `lean_log_records`: the logging module collects the thread, the process and the source
  line of every record; our JSON lines show none of them
  (https://docs.python.org/3/howto/logging.html#optimization). Process-wide.
- `pyjwt_segments`: PyJWT 2.15 refuses a segment holding a byte outside the base64url
  alphabet (GHSA-hxm8-2xgr-2p9m) by testing each byte in a Python generator, and one
  that is not canonical by encoding it again, both through Python helpers: three
  segments of every token (cProfile, when flask-jwt-extended still read each access
  token twice: 2.9 million generator steps for 2,000 GET /auth/me). Here the alphabet
  test is one `bytes.translate` call, which deletes the alphabet's bytes and leaves
  whatever else the segment holds, and the decode and the encode again are one
  `binascii` call each; the rest of PyJWT's function is unchanged. It replaces a private
  method, so it installs only over the PyJWT release it was written from (requirements.txt
  pins it). Process-wide.
- `limiter_hooks`: Flask-Limiter checks every request in a before-request hook, for its
  default, application and meta limits, and resets a per-request context in a teardown
  hook and adds its headers in an after-request one. The limits of a route decorated
  with `limiter.limit` are checked by the decorator itself; this app has no limit of
  the other kinds and sends no limit headers, so on every request the three hooks only
  cost (a third of a GET /health/live). They are taken out of the app while that holds
  (checked when the app is made); the decorated routes keep their limits unchanged.
  Written for the Flask-Limiter release requirements.txt pins (it finds the hooks by
  their private names). Per app.
- `hmac_keys`: before each HS256/384/512 signature check PyJWT makes sure the secret is no
  public key, certificate or JSON (a PEM pattern, two DER parses that fail with an
  exception each, a JSON parse that fails too): work per request on a secret that never
  changes. The HMAC algorithm of each of the app's own HMAC keys (JWT_SECRET_KEY and
  JWT_PREVIOUS_SECRET_KEYS) remembers the secret it accepted, through PyJWT's public
  `HMACAlgorithm.prepare_key`, and answers the same for it; any other key gets PyJWT's
  check. Per app.

- `verified_tokens`: every protected request verified its access token again (PyJWT:
  three segments decoded, the header and the claims parsed, the HMAC or signature, each
  claim's rule; about a fifth of a GET /auth/me), although a client sends the same token
  for its whole life. Each process remembers the tokens it verified (`KeyRing.verified`,
  at most `keys.VERIFIED_TOKENS_KEPT`, emptied when full) with the key that verified
  them and their `exp`; such a token is taken as verified while it has not expired and
  that key is still the one its kid names. The session is read on every request all the
  same: revocation stays immediate. Per app.

- `app_hooks`: Flask's `preprocess_request` (a documented method to override) walks
  the request's blueprints twice to find their URL value preprocessors and before-request
  hooks; this app has neither for a blueprint, only its own before-request hooks, which
  are then called as Flask calls them (when that no longer holds, Flask's own method
  runs). And Flask-SQLAlchemy's teardown removes the request's session even when the
  request made none, at the price of a KeyError raised and caught inside SQLAlchemy's
  scoped session: here the teardown removes it only when there is one. Per app.

Not switched, since they run when the views are decorated (at import, before any app
exists): `documentation_only`. flask-smorest's `doc` and `alt_response` only add to a
view's OpenAPI description, yet each wraps the view in a function that looks up
`current_app.ensure_sync` on every request: four such layers on GET /auth/me. The
description they build (the `_apidoc` attribute flask-smorest reads when it writes the
document) is kept on the view itself and the wrapper is dropped. Written for the
flask-smorest release requirements.txt pins; under another one the wrapper stays.

Not switched, since they replace no library code: `json_response`, the JSON answer of the
hot routes encoded by orjson in one call.
"""

from __future__ import annotations

import binascii
import functools
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

import jwt
import orjson
from flask import Flask, Response, current_app
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import DecodeError
from jwt.utils import force_bytes

from config import SPEEDUP_NAMES

log = logging.getLogger("authapp.speedups")

# The names SPEEDUPS takes (config.py parses the setting).
NAMES = SPEEDUP_NAMES

# -- sync_callables -----------------------------------------------------------------------


def cache_sync_callables(app: Flask) -> bool:
    """Remember `app.ensure_sync`'s answer for each view and hook (a fixed set)."""
    flask_ensure_sync = app.ensure_sync
    cached: dict[Any, Callable[..., Any]] = {}

    def ensure_sync(func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return cached[func]
        except KeyError:
            wrapped = flask_ensure_sync(func)
            if len(cached) < 1024:
                cached[func] = wrapped
            return wrapped
        except TypeError:  # an unhashable callable
            return flask_ensure_sync(func)

    app.ensure_sync = ensure_sync  # type: ignore[method-assign]
    return True


# -- lean_log_records ---------------------------------------------------------------------

_LOGGING_DEFAULTS = {"logThreads": logging.logThreads, "logMultiprocessing": logging.logMultiprocessing}
_SRCFILE = logging._srcfile


def lean_log_records(on: bool = True) -> bool:
    """Stop (or, with on=False, resume) collecting what our log lines never show."""
    logging.logThreads = not on and _LOGGING_DEFAULTS["logThreads"]
    logging.logMultiprocessing = not on and _LOGGING_DEFAULTS["logMultiprocessing"]
    logging._srcfile = None if on else _SRCFILE
    return True


# -- pyjwt_segments -----------------------------------------------------------------------

WRITTEN_FOR = "2.15.1"
# PyJWT 2.15.1's jwt.api_jws._BASE64URL_ALPHABET (tests/test_speedups.py compares them).
BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"", b"==", b"=")  # by the length of the unpadded text, modulo 4
# PyJWT's own function, once `pyjwt_segments()` has replaced it.
original: Callable[[bytes, str], bytes] | None = None


def decode_base64url_segment(segment: bytes, name: str) -> bytes:
    """PyJWS._decode_base64url_segment of PyJWT 2.15.1, with its alphabet test in C."""
    # Accept trailing '=' used by some issuers (e.g. AWS ALB). Still
    # reject non-alphabet junk such as '!!!!' (GHSA-hxm8-2xgr-2p9m).
    padding = 0
    stripped = segment
    while stripped.endswith(b"="):
        stripped = stripped[:-1]
        padding += 1
        if padding > 2:
            raise DecodeError(f"Invalid {name} padding")

    if padding and len(segment) % 4 != 0:
        raise DecodeError(f"Invalid {name} padding")

    if len(stripped) % 4 == 1 or stripped.translate(None, BASE64URL_ALPHABET):
        raise DecodeError(f"Invalid {name} padding")

    # base64url_decode and base64url_encode in one C call each: the standard alphabet's
    # text of the segment, padded, decoded, and encoded again (a canonical segment only).
    standard = stripped.translate(_URLSAFE_TO_STANDARD) + _PADDING[len(stripped) % 4]
    try:
        decoded = binascii.a2b_base64(standard)
    except binascii.Error as err:
        raise DecodeError(f"Invalid {name} padding") from err

    if binascii.b2a_base64(decoded, newline=False) != standard:
        raise DecodeError(f"Invalid {name} padding")

    return decoded


def pyjwt_segments(on: bool = True) -> bool:
    """Put the C-speed check in PyJWT's place (or, with on=False, PyJWT's own back); True
    when the wanted one is there."""
    global original
    if jwt.__version__ != WRITTEN_FOR:
        return not on
    try:
        from jwt.api_jws import PyJWS

        current = PyJWS.__dict__["_decode_base64url_segment"].__func__
    except (ImportError, KeyError, AttributeError):
        return not on
    if current is not decode_base64url_segment:
        original = current
    if on:
        PyJWS._decode_base64url_segment = staticmethod(decode_base64url_segment)  # type: ignore[method-assign]
    elif original is not None:
        PyJWS._decode_base64url_segment = staticmethod(original)  # type: ignore[method-assign,assignment]
    return True


# -- limiter_hooks -----------------------------------------------------------------------

LIMITER_WRITTEN_FOR = "4.1.1"


def limiter_needs_its_hooks(limiter: Any) -> bool:
    """Whether Flask-Limiter's per-request hooks have work to do: limits beyond the
    decorated ones (default, application, meta), limit headers, or a conditional
    deduction (which the after-request hook makes)."""
    manager = limiter.limit_manager
    decorated = manager._decorated_limits.values()
    return bool(
        manager.default_limits
        or manager.application_limits
        or limiter._meta_limits
        or limiter._headers_enabled
        or any(limit.deduct_when for limits in decorated for limit in limits)
    )


def drop_limiter_hooks(app: Flask, limiter: Any) -> bool:
    """Take Flask-Limiter's before-request, after-request and teardown hooks out of `app`
    when they have nothing to do; True when they are out (or were never in: limits off)."""
    import flask_limiter
    from flask_limiter import Limiter

    if flask_limiter.__version__ != LIMITER_WRITTEN_FOR:
        return False
    if not app.config.get("RATELIMIT_ENABLED") or limiter not in app.extensions.get("limiter", ()):
        return True  # RATELIMIT_ENABLED=false: Flask-Limiter added no hook
    if limiter_needs_its_hooks(limiter):
        return False
    check = limiter._check_request_limit
    inject = getattr(Limiter, "_Limiter__inject_headers", None)
    release = limiter._Limiter__release_context
    before = app.before_request_funcs.get(None, [])
    after = app.after_request_funcs.get(None, [])
    teardown = app.teardown_request_funcs.get(None, [])
    injects = [f for f in after if isinstance(f, functools.partial) and f.func is inject and f.args == (limiter,)]
    if before.count(check) != 1 or len(injects) != 1 or teardown.count(release) != 1:
        return False
    before.remove(check)
    after.remove(injects[0])
    teardown.remove(release)
    return True


# -- hmac_keys ---------------------------------------------------------------------------


class RememberingHMAC(HMACAlgorithm):
    """PyJWT's HMAC algorithm whose `prepare_key` remembers the secrets it accepted."""

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self.accepted: dict[bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        key_bytes = force_bytes(key)
        prepared = self.accepted.get(key_bytes)
        if prepared is None:
            prepared = super().prepare_key(key_bytes)  # refuses what PyJWT refuses
            if len(self.accepted) < 8:
                self.accepted[key_bytes] = prepared
        return prepared


def remember_hmac_keys(app: Flask) -> bool:
    """Give each HMAC key of the app's key ring a `RememberingHMAC` (key pair algorithms:
    nothing to do)."""
    keyring = app.extensions["authapp_keys"]
    if keyring.asymmetric:
        return True
    for key in keyring.current().keys.values():
        verifier = key.verifier
        if type(verifier.Algorithm) is HMACAlgorithm:
            verifier.Algorithm = RememberingHMAC(verifier.Algorithm.hash_alg)
    return True


# -- verified_tokens ---------------------------------------------------------------------


def remember_verified_tokens(app: Flask, on: bool) -> bool:
    """Let the app's key ring remember the access tokens it verified (or, off, forget them)."""
    app.extensions["authapp_keys"].verified = {} if on else None
    return on


# -- app_hooks -----------------------------------------------------------------------------


def lean_app_hooks(app: Flask) -> bool:
    """`app.preprocess_request` without the blueprint walk while only app-wide
    before-request hooks exist, and Flask-SQLAlchemy's teardown only when a session was
    made; True when both are in place."""
    from flask_sqlalchemy import SQLAlchemy

    from .extensions import db

    if app.extensions.get("authapp.app_hooks"):
        return True  # installed already (install() called again)
    flask_preprocess = app.preprocess_request
    url_value_preprocessors, before = app.url_value_preprocessors, app.before_request_funcs

    def preprocess_request() -> Any:
        if url_value_preprocessors or len(before) > 1 or (before and None not in before):
            return flask_preprocess()  # a blueprint's hook or a URL value preprocessor: Flask's walk
        for before_func in before.get(None, ()):
            rv = app.ensure_sync(before_func)()
            if rv is not None:
                return rv
        return None

    teardowns = app.teardown_appcontext_funcs
    theirs = [i for i, f in enumerate(teardowns) if getattr(f, "__func__", None) is SQLAlchemy._teardown_session]
    if len(theirs) != 1:
        return False
    session = db.session

    def teardown_session(_exc: BaseException | None) -> None:
        if session.registry.has():  # what scoped_session.remove() then does, without the KeyError
            session.remove()

    teardowns[theirs[0]] = teardown_session
    app.preprocess_request = preprocess_request  # type: ignore[method-assign]
    app.extensions["authapp.app_hooks"] = True
    return True


# -- documentation_only ------------------------------------------------------------------

SMOREST_WRITTEN_FOR = "0.47.0"


@functools.cache
def _smorest_version() -> str:
    return importlib.metadata.version("flask-smorest")


def documentation_only(decorator: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """flask-smorest's documentation decorator `decorator`, with the description it adds
    kept on the view and its per-request wrapper left out (the same OpenAPI document:
    tests/test_speedups.py compares them)."""
    if _smorest_version() != SMOREST_WRITTEN_FOR:
        return decorator

    def decorate(view: Any) -> Any:
        wrapper = decorator(view)
        view._apidoc = wrapper._apidoc  # a copy of the view's, with this decorator's part added
        return view

    return decorate


# -- json_response -----------------------------------------------------------------------

_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def json_response(body: dict[str, Any]) -> Response:
    """`flask.jsonify(body)` outside debug mode for a body of strings, numbers, booleans,
    None, lists and dicts: the same keys in the same order, the same status, Content-Type
    and line end (tests/test_speedups.py compares them), encoded by orjson in one call
    instead of a `json.JSONEncoder` made for each answer. Non-ASCII characters are written
    as UTF-8 instead of `\\u` escapes: the same JSON."""
    return current_app.response_class(orjson.dumps(body, option=_JSON_OPTIONS), mimetype="application/json")


# -- Switching them -----------------------------------------------------------------------


def install(app: Flask, wanted: tuple[str, ...]) -> dict[str, bool]:
    """Turn on the speed-ups named in `wanted` and off the others; returns which are on.
    One that could not be installed is logged, and the library's own code stays."""
    from .extensions import limiter

    installed = {
        "sync_callables": "sync_callables" in wanted and cache_sync_callables(app),
        "limiter_hooks": "limiter_hooks" in wanted and drop_limiter_hooks(app, limiter),
        "hmac_keys": "hmac_keys" in wanted and remember_hmac_keys(app),
        "verified_tokens": remember_verified_tokens(app, "verified_tokens" in wanted),
        "app_hooks": "app_hooks" in wanted and lean_app_hooks(app),
    }
    # Process-wide ones are switched both ways, so that an app made without them gets the
    # library's own code back.
    for name, switch in (("lean_log_records", lean_log_records), ("pyjwt_segments", pyjwt_segments)):
        on = name in wanted
        installed[name] = switch(on) and on
    for name in wanted:
        if not installed[name]:
            log.warning(
                "speed-up %s not installed (written for another library release); the library's own code runs",
                name,
                extra={"event": "speedup_not_installed", "speedup": name},
            )
    app.extensions["authapp.speedups"] = installed
    return installed
