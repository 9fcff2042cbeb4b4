"""The schema comes from the migrations, matches the models, and enforces uniqueness itself."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers import PASSWORD, live_server, post_json
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from authapp.extensions import db
from authapp.models import User


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
