"""Email addresses in one canonical form (NFKC, lowercase): look-alikes are one address,
at register, login and for operators, and the migration brings existing rows to it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import flask_migrate
import pytest
from helpers import PASSWORD, TEST_DATABASE_URL, assert_error, base_settings
from sqlalchemy import text
from sqlalchemy.engine import make_url

from authapp import create_app
from authapp.extensions import db
from authapp.identifiers import canonical_email
from devtools.postgres import admin_connection


def register(client, email, username):
    return client.post("/auth/register", json={"email": email, "username": username, "password": PASSWORD})


@pytest.mark.parametrize(
    "first,look_alike",
    [
        ("johnx@example.com", "ｊｏｈｎX@example.com"),  # fullwidth letters
        ("fix@example.com", "ﬁX@example.com"),  # the fi ligature
        ("ann@example.com", "ANN@ＥＸＡＭＰＬＥ.com"),  # fullwidth domain, upper case
        ("mbx@example.com", "㎆x@example.com"),  # one code point that NFKC makes two ("MB")
    ],
)
def test_look_alike_addresses_are_one_account(client, first, look_alike):
    first = canonical_email(first)
    assert register(client, first, "first").status_code == 201
    assert_error(register(client, look_alike, "second"), 409, "USER_ALREADY_EXISTS")
    logged_in = client.post("/auth/login", json={"email": look_alike, "password": PASSWORD})
    assert logged_in.status_code == 200, logged_in.get_json()
    assert logged_in.get_json()["user"]["username"] == "first"


def test_the_address_is_stored_in_its_canonical_form(client):
    body = register(client, "ＪｏｈｎＸ@Example.COM", "john").get_json()
    assert body["user"]["email"] == "johnx@example.com"


def test_canonical_form_is_stable():
    for address in ("ＪｏｈｎＸ@Example.COM", "ﬁ@x.org", "İ@x.org", "ẞ@x.org", "㎆@x.org"):
        once = canonical_email(address)
        assert canonical_email(once) == once


# -- The migration, on rows written before it ---------------------------------------------


@pytest.fixture
def empty_database_url(backend, tmp_path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'before.db'}"
        return
    if not TEST_DATABASE_URL:
        pytest.skip("PostgreSQL skipped: TEST_DATABASE_URL not set")
    server = make_url(TEST_DATABASE_URL)
    name = f"authapp_test_mig_{os.getpid()}"
    with admin_connection(server) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)
    finally:
        with admin_connection(server) as conn, conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


ROWS = [
    (1, "ｊｏｈｎx@example.com", "john"),  # alone: rewritten
    (2, "fix@example.com", "plainfi"),  # these two collide: both kept as they are
    (3, "ﬁx@example.com", "ligature"),
    (4, "Upper@Example.com", "upper"),  # alone: lowercased
    (5, "plain@example.com", "plain"),  # already canonical
]


def test_migration_normalises_rows_and_leaves_collisions_for_the_operator(empty_database_url):
    app = create_app(base_settings(DATABASE_URL=empty_database_url))
    with app.app_context():
        flask_migrate.upgrade(revision="0002_sessions")
        for user_id, email, username in ROWS:
            db.session.execute(
                text(
                    "INSERT INTO users (id, email, username, hashed_password, is_active, created_at, updated_at)"
                    " VALUES (:id, :email, :username, 'x', true, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                ),
                {"id": user_id, "email": email, "username": username},
            )
        db.session.commit()
        flask_migrate.upgrade()
        stored = dict(db.session.execute(text("SELECT id, email FROM users")).all())
        db.engine.dispose()
    assert stored == {
        1: "johnx@example.com",
        2: "fix@example.com",
        3: "ﬁx@example.com",
        4: "upper@example.com",
        5: "plain@example.com",
    }
    result = app.test_cli_runner().invoke(args=["users", "email-collisions"])
    assert result.exit_code == 0, result.output
    assert result.output == "fix@example.com\t2:fix@example.com\t3:ﬁx@example.com\n"
    # the unique index is on the canonical form: a new look-alike is refused
    client = app.test_client()
    assert_error(register(client, "ＵＰＰＥＲ@example.com", "another"), 409, "USER_ALREADY_EXISTS")
    with app.app_context():
        db.engine.dispose()


def test_no_collisions_says_so(app):
    result = app.test_cli_runner().invoke(args=["users", "email-collisions"])
    assert result.exit_code == 0 and result.output == "no colliding addresses\n"
