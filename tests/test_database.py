"""The schema comes from the migrations, matches the models, and enforces uniqueness itself;
every migration, down and up, keeps every row and index the schema it leads to can hold."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import flask_migrate
import pyotp
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import PASSWORD, base_settings, bearer, live_server, post_json
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError

from authapp import create_app
from authapp.auth import keys
from authapp.extensions import db
from authapp.models import User

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


# SQLite cannot reflect expression indexes; PostgreSQL compares them too.
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_migrations_match_the_models(app, backend):
    with app.app_context(), db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
    assert diff == []


def test_database_enforces_case_insensitive_uniqueness(app):
    def insert(email, username):
        db.session.add(User(email=email, username=username, hashed_password="x"))
        db.session.commit()

    with app.app_context():
        insert("a@example.com", "Alice")
        for email, username in (("b@example.com", "alice"), ("A@EXAMPLE.COM", "bob")):
            with pytest.raises(IntegrityError):
                insert(email, username)
            db.session.rollback()
        assert db.session.scalar(select(func.count()).select_from(User)) == 1


def test_concurrent_registrations_of_one_email(app, backend):
    if backend != "postgresql":
        pytest.skip("the race is shown on PostgreSQL; SQLite serialises writers")
    results: list[int] = []
    barrier = threading.Barrier(8)

    with live_server(app) as base:

        def register(i: int) -> None:
            barrier.wait()
            body = {"email": "race@example.com", "username": f"racer{i}", "password": PASSWORD}
            results.append(post_json(f"{base}/auth/register", body)[0])

        threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

    assert sorted(results) == [201] + [409] * 7
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 1


# -- Every migration keeps the rows both ways -----------------------------------------

Rows = dict[str, tuple[tuple[str, ...], list[tuple]]]


def every_row(app) -> Rows:
    """Each table's column names and rows as the driver gives them (no type conversion)."""
    with app.app_context():
        with db.engine.connect() as conn:
            found: Rows = {}
            for name in inspect(conn).get_table_names():
                if name != "alembic_version":
                    result = conn.exec_driver_sql(f'SELECT * FROM "{name}"')
                    found[name] = (tuple(result.keys()), [tuple(row) for row in result])
        db.engine.dispose()
    return found


def indexes(app) -> set[tuple[str, str]]:
    """Every (table, index) the database has, the ones SQLAlchemy cannot reflect too."""
    with app.app_context():
        with db.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                query = "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            else:
                query = "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = current_schema()"
            found = {(table, name) for table, name in conn.exec_driver_sql(query)}
        db.engine.dispose()
    return found


def assert_kept(before: Rows, after: Rows, step: str) -> None:
    """Every table both schemas have keeps every row, in the columns both have."""

    def projected(columns: tuple[str, ...], rows: list[tuple], common: list[str]) -> Counter:
        return Counter(tuple(row[columns.index(c)] for c in common) for row in rows)

    changed = []
    for name in sorted(before.keys() & after.keys()):
        (old_columns, old_rows), (new_columns, new_rows) = before[name], after[name]
        common = [c for c in old_columns if c in new_columns]
        if projected(new_columns, new_rows, common) != projected(old_columns, old_rows, common):
            changed.append(f"{name} ({len(old_rows)} rows before, {len(new_rows)} after)")
    assert not changed, f"{step} changed {', '.join(changed)}"


# Alembic's batch mode reflects the table it copies, and SQLite cannot reflect expression
# indexes: the warning is not the failure this test is about.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_every_migration_keeps_every_row_and_index_both_ways(database_url):
    # The service's own settings: SQLite connections with foreign keys on, so a migration
    # that copies a table others reference would delete their rows by cascade.
    app = create_app(
        base_settings(
            DATABASE_URL=database_url,
            JWT_ALGORITHM="ES256",
            MAIL_URL="smtp://127.0.0.1:9",
            FRONTEND_URL="https://app.example.com",
        )
    )
    client = app.test_client()
    with app.app_context():
        keys.generate(activate=True)
    body = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    registered = client.post("/auth/register", json=body)
    assert registered.status_code == 201, registered.get_json()
    access = registered.get_json()["access_token"]
    setup = client.post("/auth/mfa/totp/setup", headers=bearer(access), json={"current_password": PASSWORD})
    code = pyotp.TOTP(setup.get_json()["secret"]).now()
    assert client.post("/auth/mfa/totp/enable", headers=bearer(access), json={"code": code}).status_code == 200
    wrong = client.post("/auth/login", json={"username": "alice", "password": "not-the-password-1"})
    assert wrong.status_code == 401

    rows = every_row(app)
    for name in (
        "users",
        "sessions",
        "refresh_tokens",
        "one_time_tokens",
        "mail_outbox",
        "signing_keys",
        "mfa_totp",
        "mfa_recovery_codes",
        "login_attempts",
    ):
        assert rows[name][1], f"no row in {name}"

    # Each migration from the newest down: its downgrade keeps every row the older schema
    # can hold, and its upgrade, run on those rows, keeps them too and gives back every
    # index the newer schema had.
    revisions = list(ScriptDirectory(str(MIGRATIONS)).walk_revisions())
    assert len(revisions) >= 6
    for script in revisions:
        older = script.down_revision or "base"
        newer_indexes = indexes(app)
        with app.app_context():
            flask_migrate.downgrade(revision=older)
            db.engine.dispose()
        below, older_indexes = every_row(app), indexes(app)
        assert_kept(rows, below, f"the downgrade of {script.revision}")
        if older != "base":
            assert below["users"][1], f"the downgrade of {script.revision} left no user"
        with app.app_context():
            flask_migrate.upgrade(revision=script.revision)
            db.engine.dispose()
        assert_kept(below, every_row(app), f"the upgrade of {script.revision}")
        assert indexes(app) == newer_indexes, f"the upgrade of {script.revision}"
        with app.app_context():
            flask_migrate.downgrade(revision=older)
            db.engine.dispose()
        rows = every_row(app)
        assert_kept(below, rows, f"the second downgrade of {script.revision}")
        assert indexes(app) == older_indexes, f"the second downgrade of {script.revision}"
    assert rows == {}
