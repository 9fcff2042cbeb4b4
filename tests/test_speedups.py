"""The speed-ups of authapp/speedups.py: each installed by default, each agreeing with the
library code it replaces, each off with SPEEDUPS, and a warning when one cannot install."""

from __future__ import annotations

import logging

import jwt
from flask import Flask
from helpers import base_settings, bearer
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS

from authapp import create_app, speedups


def test_all_are_installed_by_default(app):
    assert app.extensions["authapp.speedups"] == dict.fromkeys(speedups.NAMES, True)
    assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is speedups.decode_base64url_segment
    assert logging._srcfile is None and logging.logThreads is False


def test_none_puts_the_libraries_own_code_back(app, database_url):
    off = create_app(base_settings(DATABASE_URL=database_url, SPEEDUPS="none"))
    try:
        assert off.extensions["authapp.speedups"] == dict.fromkeys(speedups.NAMES, False)
        assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is speedups.original
        assert logging._srcfile is not None and logging.logThreads is True
        assert "ensure_sync" not in vars(off)  # Flask's own method
        assert off.test_client().get("/health/live").status_code == 200
    finally:
        speedups.install(app, speedups.NAMES)  # the process-wide ones back for the other tests


def test_a_list_names_the_ones_to_use(database_url):
    app = create_app(base_settings(DATABASE_URL=database_url, SPEEDUPS="sync_callables"))
    try:
        assert app.extensions["authapp.speedups"] == {
            "sync_callables": True,
            "lean_log_records": False,
            "pyjwt_segments": False,
        }
    finally:
        speedups.install(app, speedups.NAMES)


# -- sync_callables -------------------------------------------------------------------------


def test_sync_callables_agree_with_flask(app, client, tokens):
    plain = Flask("plain")

    def view():
        return "ok"

    async def coroutine_view():
        return "ok"

    assert app.ensure_sync(view) is plain.ensure_sync(view) is view
    assert app.ensure_sync(view) is app.ensure_sync(view)

    # A coroutine function still goes to Flask's own handling (which wants asgiref).
    def outcome(ensure_sync):
        try:
            return ("ok", ensure_sync(coroutine_view)())
        except RuntimeError as exc:
            return ("RuntimeError", str(exc))

    assert outcome(app.ensure_sync) == outcome(plain.ensure_sync)
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200


# -- lean_log_records -------------------------------------------------------------------------


def test_lean_log_records_leave_our_lines_as_they_were(app, log_lines):
    logger = logging.getLogger("authapp.test")

    def line() -> dict:
        logger.warning("same line", extra={"event": "x", "n": 1})
        entry = log_lines()[-1]
        entry.pop("timestamp")
        return entry

    speedups.lean_log_records(False)
    try:
        without = line()
    finally:
        speedups.lean_log_records(True)
    assert line() == without


# -- pyjwt_segments ---------------------------------------------------------------------------

SEGMENT_BYTES = st.binary(max_size=24) | st.text(alphabet="AZaz09-_=+/!. \x00é", max_size=24).map(str.encode)


def _outcome(function, segment: bytes):
    try:
        return ("ok", function(segment, "payload"))
    except jwt.exceptions.DecodeError as exc:
        return ("DecodeError", str(exc))


@settings(max_examples=3000, deadline=None)
@given(segment=SEGMENT_BYTES)
@example(segment=b"!!!!")
@example(segment=b"eyJ9")
@example(segment=b"eyJ9=")
@example(segment=b"eQ==")
@example(segment=b"eQ===")
@example(segment=b"eR")  # a non-canonical last character: decodes, but not to itself
@example(segment=b"e")
@example(segment=b"ab+/")
@example(segment=b"")
def test_the_fast_segment_check_agrees_with_pyjwt(segment):
    speedups.pyjwt_segments()
    assert speedups.original is not None
    assert _outcome(speedups.decode_base64url_segment, segment) == _outcome(speedups.original, segment)


def test_the_fast_segment_check_is_written_for_the_pinned_pyjwt(app):
    assert jwt.__version__ == speedups.WRITTEN_FOR, "requirements.txt pins the release it was written for"
    assert speedups.BASE64URL_ALPHABET == jwt.api_jws._BASE64URL_ALPHABET


def test_the_fast_segment_check_stays_out_of_other_pyjwt_releases(app, monkeypatch, log_lines):
    own = speedups.original
    assert own is not None
    monkeypatch.setattr(PyJWS, "_decode_base64url_segment", staticmethod(own))
    monkeypatch.setattr(jwt, "__version__", "9.9.9")
    assert speedups.pyjwt_segments() is False
    assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is own
    installed = speedups.install(app, speedups.NAMES)
    assert installed["pyjwt_segments"] is False
    (warning,) = [e for e in log_lines() if e.get("event") == "speedup_not_installed"]
    assert warning["speedup"] == "pyjwt_segments" and warning["level"] == "WARNING"
    # A release without the private function: no error, nothing installed.
    monkeypatch.setattr(jwt, "__version__", speedups.WRITTEN_FOR)
    monkeypatch.delattr(PyJWS, "_decode_base64url_segment")
    assert speedups.pyjwt_segments() is False
