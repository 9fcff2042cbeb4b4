"""/docs (Swagger UI) and /redoc (ReDoc) in a real browser, with nothing but loopback.

The browser_page fixture fails a test whose page asked for any address outside loopback,
threw, or broke its Content-Security-Policy; these tests also want a console with no error
at all, so a CSP or an asset route that breaks the pages fails here, not in a user's
browser. The API is served on 127.0.0.2, a loopback address that Swagger UI does not treat
as "localhost" (it skips some remote calls for localhost and 127.0.0.1 only), so the pages
behave as they do on a real host.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from browser_support import LiveServer, serve
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head"}
DOCS_HOST = "127.0.0.2"


@pytest.fixture
def docs_api(app) -> Iterator[LiveServer]:
    with serve(app, host=DOCS_HOST) as server:
        yield server


@pytest.fixture
def operations(client) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in the app's OpenAPI document."""
    spec = client.get("/openapi.json").get_json()
    ops = {(method.upper(), path) for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS}
    assert len(ops) >= 11, ops  # CONTRACT.md's endpoints, at least
    return ops


def assert_self_contained(watch, server: LiveServer, path: str) -> None:
    """The page asked the app for everything it needed (blob: workers aside), all of it
    loaded, and the console has no error."""
    requested = [r.url for r in watch.requests]
    assert requested[0] == server.url + path
    assert any("/docs-assets/" in url for url in requested), requested
    elsewhere = [url for url in requested if not url.startswith((server.url + "/", "blob:" + server.url + "/"))]
    assert elsewhere == [], f"{path} asked for {elsewhere}"
    assert watch.failed == [], watch.failed
    assert watch.console_errors() == [], watch.console_errors()


def test_swagger_ui_lists_every_operation_and_try_it_out_calls_health(browser_page, docs_api, operations):
    page, watch = browser_page.page, browser_page.watch

    response = page.goto(docs_api.url + "/docs")
    assert response is not None and response.status == 200
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("authapp")
    blocks = page.locator(".opblock")
    expect(blocks).to_have_count(len(operations))
    listed = blocks.evaluate_all(
        "blocks => blocks.map(b => [b.querySelector('.opblock-summary-method').textContent.trim(),"
        " b.querySelector('.opblock-summary-path').dataset.path])"
    )
    listed = {tuple(pair) for pair in listed}
    assert listed == operations
    browser_page.screenshot("swagger-ui")

    health = blocks.filter(has=page.locator('.opblock-summary-path[data-path="/health"]'))
    expect(health).to_have_count(1)
    health.locator(".opblock-summary-control").click()
    health.get_by_role("button", name="Try it out").click()
    with page.expect_response(docs_api.url + "/health") as called:
        health.get_by_role("button", name="Execute").click()
    assert called.value.status == 200
    assert called.value.json()["status"] == "healthy"
    result = health.locator(".live-responses-table .response").first
    expect(result.locator(".response-col_status")).to_have_text("200")
    expect(result.locator(".response-col_description")).to_contain_text('"status": "healthy"')
    health.scroll_into_view_if_needed()
    browser_page.screenshot("swagger-ui-try-it-out-health")

    assert ("GET", "/health") in watch.api_calls(docs_api.url)
    assert_self_contained(watch, docs_api, "/docs")


def test_redoc_renders_every_operation(browser_page, docs_api, operations):
    page, watch = browser_page.page, browser_page.watch

    response = page.goto(docs_api.url + "/redoc")
    assert response is not None and response.status == 200
    expect(page.locator("h1")).to_contain_text("authapp")
    # The side menu names each operation by its JSON pointer: tag/<tag>/paths/<path>/<method>.
    entries = page.locator('li[data-item-id*="/paths/"]')
    expect(entries).to_have_count(len(operations))
    shown = set()
    for item_id in entries.evaluate_all("items => items.map(i => i.dataset.itemId)"):
        pointer, method = item_id.split("/paths/", 1)[1].rsplit("/", 1)
        shown.add((method.upper(), pointer.replace("~1", "/").replace("~0", "~")))
    assert shown == operations
    # The middle panel renders the operations themselves, with their request samples.
    expect(page.get_by_role("heading", name="Create an account and start a session.")).to_be_visible()
    expect(page.get_by_text("/auth/register").first).to_be_attached()
    page.wait_for_load_state("networkidle")
    browser_page.screenshot("redoc")

    assert ("GET", "/openapi.json") in watch.api_calls(docs_api.url)
    assert_self_contained(watch, docs_api, "/redoc")
