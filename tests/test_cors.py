"""CORS: none by default; the listed origins only, with credentials."""

from __future__ import annotations

import pytest

ORIGIN = "https://app.example.com"


def test_no_cors_by_default(client):
    response = client.get("/health/live", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("settings", [{"CORS_ORIGINS": f"{ORIGIN}, http://localhost:3000"}])
def test_listed_origin_is_allowed_with_credentials(client):
    preflight = client.options(
        "/auth/login",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    response = client.get("/health/live", headers={"Origin": ORIGIN})
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize("settings", [{"CORS_ORIGINS": ORIGIN}])
def test_unlisted_origin_gets_no_cors_headers(client):
    response = client.get("/health/live", headers={"Origin": "https://evil.example.net"})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Credentials" not in response.headers
