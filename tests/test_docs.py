"""OpenAPI document, Swagger UI and ReDoc, with their assets served by the app."""

from __future__ import annotations

import re

import pytest

EXPECTED = {
    ("/auth/register", "post"): {"201", "400", "409", "413", "415"},
    ("/auth/login", "post"): {"200", "400", "401", "403", "415"},
    ("/auth/refresh", "post"): {"200", "400", "401"},
    ("/auth/me", "get"): {"200", "401"},
    ("/auth/logout", "post"): {"204", "400", "401", "415"},
    ("/auth/logout-all", "post"): {"204", "401"},
    ("/auth/change-password", "post"): {"200", "400", "401", "415"},
    ("/auth/sessions", "get"): {"200", "401"},
    ("/auth/sessions/{session_id}", "delete"): {"204", "401", "404"},
    ("/auth/password-reset/request", "post"): {"202", "400", "413", "415", "429"},
    ("/auth/password-reset", "post"): {"200", "400", "415", "429"},
    ("/auth/verify-email/request", "post"): {"202", "401", "429"},
    ("/auth/verify-email", "post"): {"200", "400", "409", "415", "429"},
    ("/auth/change-email", "post"): {"202", "400", "401", "409", "415", "429"},
    ("/health", "get"): {"200", "503"},
    ("/health/live", "get"): {"200"},
}


def test_openapi_document(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    for (path, method), statuses in EXPECTED.items():
        operation = spec["paths"][path][method]
        assert statuses <= set(operation["responses"]), (path, operation["responses"].keys())
    for path, method in EXPECTED:
        protected = path.startswith(
            ("/auth/me", "/auth/logout", "/auth/change", "/auth/sessions", "/auth/verify-email/request")
        )
        assert (spec["paths"][path][method].get("security") == [{"bearerAuth": []}]) == protected, path
    schemas = spec["components"]["schemas"]
    assert {"detail", "error_code", "timestamp", "request_id"} <= set(schemas["Error"]["properties"])
    assert {"email", "username", "password"} == set(schemas["Register"]["properties"])
    assert spec["paths"]["/auth/logout"]["post"]["requestBody"]["required"] is False
    assert spec["paths"]["/auth/login"]["post"]["requestBody"]["required"] is True
    assert "hashed_password" not in str(spec)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_use_only_local_assets(client, page):
    response = client.get(page)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources, html
    for source in sources:
        assert source.startswith("/"), f"{page} loads {source} from elsewhere"
        with client.get(source) as asset:
            assert asset.status_code == 200, source
            assert len(asset.get_data()) > 100


def test_unknown_asset_is_404(client):
    assert client.get("/docs-assets/../../config.py").status_code == 404
    assert client.get("/docs-assets/evil.js").status_code == 404


def test_redoc_bundle_loads_nothing_from_a_cdn(client):
    """ReDoc's menu footer would fetch Redocly's logo from its CDN; the app serves it without."""
    response = client.get("/docs-assets/redoc.standalone.js")
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    body = response.get_data(as_text=True)
    assert len(body) > 100_000 and "Redoc" in body
    assert "cdn.redoc.ly" not in body
    assert (
        client.get("/docs-assets/redoc.standalone.js", headers={"If-None-Match": response.headers["ETag"]}).status_code
        == 304
    )
