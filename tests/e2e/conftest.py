"""The end-to-end suite: HTTP through nginx (nginx.conf) to uWSGI instances (uwsgi.ini) on
PostgreSQL, all started here on loopback ports and stopped afterwards.

`make e2e` runs it (it installs uWSGI and sets AUTHAPP_E2E=1); `make test` skips it.
It needs TEST_DATABASE_URL: a PostgreSQL role that may create databases.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import Api, Stack, running_stack

E2E = os.environ.get("AUTHAPP_E2E") == "1"
HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    if E2E:
        # `timeout` (make e2e) sends SIGTERM: stop like on Ctrl-C, so that the fixtures
        # stop every nginx and uWSGI they started.
        signal.signal(signal.SIGTERM, _interrupted)


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if E2E:
        return
    skip = pytest.mark.skip(reason="end-to-end suite: run it with `make e2e`")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def admin_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if not url:
        pytest.fail("the end-to-end suite needs TEST_DATABASE_URL (a PostgreSQL role that may create databases)")
    return url


@pytest.fixture(scope="module")
def stack(admin_url, tmp_path_factory) -> Iterator[Stack]:
    """Three instances behind nginx; bcrypt at cost 4 keeps the suite quick."""
    with running_stack(admin_url, tmp_path_factory.mktemp("stack"), env={"BCRYPT_ROUNDS": "4"}) as stack:
        yield stack


@pytest.fixture
def api(stack) -> Api:
    return Api(stack, stack.https_url)
