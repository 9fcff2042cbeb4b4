"""Flask extensions, created unbound and bound to an app in `create_app`."""

import sqlite3

from flask_cors import CORS
from flask_jwt_extended import JWTManager
from flask_limiter import Limiter
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase

from .addresses import rate_limit_key


class Base(DeclarativeBase):
    pass


# expire_on_commit=False: objects stay readable after a unit of work commits, so a view
# can serialise them without a second round trip.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
migrate = Migrate()
jwt = JWTManager()
cors = CORS()
# Per client address, as nginx saw it (REMOTE_ADDR; an IPv6 client by its /64);
# X-Forwarded-For is never read. When
# the shared storage (Redis) fails, limits fall back to per-process memory and the error
# is logged, rather than refusing every login.
limiter = Limiter(
    key_func=rate_limit_key,
    strategy="moving-window",
    in_memory_fallback_enabled=True,
    swallow_errors=True,
)


@event.listens_for(Engine, "connect")
def _sqlite_enforces_foreign_keys(dbapi_connection, _record) -> None:
    # SQLite ignores ON DELETE CASCADE and foreign keys unless each connection asks.
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
