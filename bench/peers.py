"""The peers `make bench` can measure beside authapp in the same run:

- another commit of authapp (`--baseline GITREF`): a `git worktree` of it, served by a
  stack of its own (its uwsgi.ini and nginx.conf, a database of its own);
- the backend of the FastAPI full-stack template (`--peer-fastapi PATH`, a checkout of
  github.com/fastapi/full-stack-fastapi-template): `fastapi run --workers 2` as its
  Dockerfile runs it, on a database of its own on the same PostgreSQL, behind an nginx of
  its own with nginx.conf's TLS settings.

None of their code is part of this repository.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy.engine import make_url

from devtools.stack import (
    NGINX_CONF,
    PASSWORD,
    ROOT,
    _stop_group,
    call,
    create_database,
    drop_database,
    free_port,
    nginx_main_conf,
    self_signed_certificate,
    start_logged,
    start_nginx,
)


@contextmanager
def baseline_tree(ref: str) -> Iterator[tuple[Path, str]]:
    """A detached `git worktree` of `ref`, removed afterwards: (its path, its short commit)."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", f"{ref}^{{commit}}"], capture_output=True, text=True
    )
    if found.returncode != 0:
        raise SystemExit(f"--baseline {ref}: not a commit of this repository ({found.stderr.strip()})")
    commit = found.stdout.strip()
    path = Path(tempfile.mkdtemp(prefix="authapp-baseline-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True, capture_output=True
    )
    try:
        yield path, commit
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path.parent, ignore_errors=True)


def tls_settings(conf: str = NGINX_CONF.read_text()) -> list[str]:
    """nginx.conf's TLS lines (protocols, ciphers, session cache), for a peer's nginx."""
    lines = [line.strip() for line in conf.splitlines() if re.match(r"\s*ssl_(?!certificate)", line)]
    if not lines:
        raise AssertionError("nginx.conf has no ssl_ settings")
    return [line.replace("shared:authapp_tls", "shared:peer_tls") for line in lines]


def template_backend(checkout: Path, venv: Path) -> Path:
    """The `backend/` of a template checkout (or the checkout's backend itself), once its
    app and its venv's `fastapi` command are found; else the reason, on standard error."""
    backend = checkout / "backend" if (checkout / "backend").is_dir() else checkout
    if not (backend / "app" / "main.py").exists():
        raise SystemExit(f"--peer-fastapi {checkout}: no backend/app/main.py (a template checkout?)")
    if not (venv / "bin" / "fastapi").exists():
        raise SystemExit(f"--peer-fastapi-venv {venv}: no bin/fastapi (`uv sync` in backend/ makes it)")
    return backend


@dataclass
class FastAPIPeer:
    """The template's backend (`backend/` of a checkout) with the Python of its own venv
    (`uv sync` makes backend/.venv). Its user is its first superuser, made by its own
    `init_db`; its tables are made from its models (what its migrations make)."""

    checkout: Path
    venv: Path
    admin_url: str
    workdir: Path
    workers: int = 2
    database: str = field(default_factory=lambda: f"authapp_bench_peer_{os.getpid()}_{uuid.uuid4().hex[:6]}")
    server: subprocess.Popen | None = None
    nginx: subprocess.Popen | None = None
    email: str = "bench-peer@example.com"

    def __post_init__(self) -> None:
        self.backend = template_backend(self.checkout, self.venv)
        self.port, self.https_port = free_port(), free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = self_signed_certificate(self.workdir)

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def env(self) -> dict[str, str]:
        url = make_url(self.admin_url)
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ")}
        return {
            **base,
            "ENVIRONMENT": "production",
            "PROJECT_NAME": "full-stack-fastapi-template",
            "SECRET_KEY": uuid.uuid4().hex + uuid.uuid4().hex,
            "POSTGRES_SERVER": url.host or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": url.username or "postgres",
            "POSTGRES_PASSWORD": url.password or "",
            "POSTGRES_DB": self.database,
            "FIRST_SUPERUSER": self.email,
            "FIRST_SUPERUSER_PASSWORD": PASSWORD,
        }

    def start(self) -> FastAPIPeer:
        try:
            create_database(self.admin_url, self.database)
            prepare = (
                "from sqlmodel import Session, SQLModel\n"
                "from app.core.db import engine, init_db\n"
                "SQLModel.metadata.create_all(engine)\n"
                "with Session(engine) as session:\n"
                "    init_db(session)\n"
            )
            python = str(self.venv / "bin" / "python")
            subprocess.run([python, "-c", prepare], cwd=self.backend, env=self.env(), check=True, timeout=120,
                           capture_output=True)  # fmt: skip
            command = [str(self.venv / "bin" / "fastapi"), "run", "--workers", str(self.workers)]
            command += ["--host", "127.0.0.1", "--port", str(self.port), "app/main.py"]
            self.server = start_logged(command, self.workdir / "fastapi.log", self.backend, self.env())
            self._wait_listening()
            self.nginx = start_nginx(self._nginx_conf(), self.workdir, self.workdir, self.https_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.server is not None
            if self.server.poll() is not None:
                raise RuntimeError(
                    "the template's server exited:\n" + (self.workdir / "fastapi.log").read_text()[-4000:]
                )
            try:
                reply = call(f"http://127.0.0.1:{self.port}", "GET", "/api/v1/utils/health-check/", timeout=2)
                if reply.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the template's server did not answer")

    def _nginx_conf(self) -> Path:
        site = self.workdir / "peer.conf"
        site.write_text(
            "upstream peer {\n"
            f"    server 127.0.0.1:{self.port};\n"
            "    keepalive 64;\n"
            "}\n"
            "server {\n"
            f"    listen 127.0.0.1:{self.https_port} ssl http2;\n"
            "    server_tokens off;\n"
            f"    ssl_certificate {self.cert};\n"
            f"    ssl_certificate_key {self.key};\n"
            + "".join(f"    {line}\n" for line in tls_settings())
            + "    keepalive_timeout 65s;\n"
            "    location / {\n"
            "        proxy_pass http://peer;\n"
            "        proxy_http_version 1.1;\n"
            '        proxy_set_header Connection "";\n'
            "        proxy_set_header Host $host;\n"
            "        proxy_set_header X-Forwarded-For $remote_addr;\n"
            "    }\n"
            "}\n"
        )
        return nginx_main_conf(self.workdir, self.workdir, 1, site)

    def access_token(self) -> str:
        """A token from the template's own login (OAuth2 password form)."""
        form = urlencode({"username": self.email, "password": PASSWORD}).encode()
        reply = call(self.https_url, "POST", "/api/v1/login/access-token", body=form,
                     headers={"Content-Type": "application/x-www-form-urlencoded"},
                     tls=self.tls_context())  # fmt: skip
        assert reply.status == 200, reply.body
        return reply.json()["access_token"]

    def process_groups(self) -> set[int]:
        return {p.pid for p in (self.server, self.nginx) if p is not None}

    def stop(self) -> None:
        for process, signum in ((self.nginx, signal.SIGQUIT), (self.server, signal.SIGTERM)):
            if process is not None and process.returncode is None:
                _stop_group(process, signum, 30)
        drop_database(self.admin_url, self.database)
