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


# -- The document itself: valid OpenAPI 3.0, with the contract's field rules ----------------


def test_openapi_document_is_valid_openapi_3_0(client):
    from openapi_spec_validator import OpenAPIV30SpecValidator, validate

    spec = client.get("/openapi.json").get_json()
    validate(spec, cls=OpenAPIV30SpecValidator)  # raises on any violation
    # `servers` is a list or absent (null is not OpenAPI); no schema is left unused.
    assert isinstance(spec.get("servers", []), list)
    unused = [name for name in spec["components"]["schemas"] if f"#/components/schemas/{name}'" not in str(spec)]
    assert unused == [] and "PaginationMetadata" not in str(spec), unused


@pytest.mark.parametrize("settings", [{"PASSWORD_MIN_LENGTH": "12"}])
def test_request_schemas_carry_the_field_rules(client, settings):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    email = {"type": "string", "format": "email", "maxLength": 100}
    username = {"type": "string", "minLength": 3, "maxLength": 50, "pattern": "^[A-Za-z0-9_.-]{3,50}$"}
    new_password = {"type": "string", "minLength": 12, "maxLength": 128}  # PASSWORD_MIN_LENGTH
    register = schemas["Register"]["properties"]
    assert email.items() <= register["email"].items()
    assert username.items() <= register["username"].items()
    assert new_password.items() <= register["password"].items()
    # Every request that chooses a password states the rules: change, reset, and any later one.
    choosing = sorted(name for name, schema in schemas.items() if "new_password" in schema.get("properties", {}))
    assert {"ChangePassword", "PasswordReset"} <= set(choosing), choosing
    for name in choosing:
        assert new_password.items() <= schemas[name]["properties"]["new_password"].items(), name
    # A password given to log in or to confirm is checked for its length only at the top.
    login = schemas["Login"]["properties"]
    assert email.items() <= login["email"].items()
    assert login["password"] == {"type": "string", "maxLength": 128}
    assert schemas["ChangePassword"]["properties"]["current_password"] == {"type": "string", "maxLength": 128}


def test_username_pattern_in_the_document_is_the_rule_the_api_applies(client):
    import re

    pattern = client.get("/openapi.json").get_json()["components"]["schemas"]["Register"]["properties"]["username"]
    rule = re.compile(pattern["pattern"])
    for name, valid in [("ab", False), ("abc", True), ("a" * 50, True), ("a" * 51, False), ("a b", False),
                        ("Al.ice-_9", True), ("abc\n", False), ("é" * 3, False)]:  # fmt: skip
        assert (rule.search(name) is not None and rule.search(name).group() == name) == valid, name
        reply = client.post("/auth/register", json={"email": "x@example.com", "username": name, "password": "x"})
        assert ("username" in reply.get_json().get("errors", {})) == (not valid), name
