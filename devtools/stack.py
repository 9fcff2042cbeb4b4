"""The production stack on loopback: uWSGI instances started from uwsgi.ini and nginx
from nginx.conf, with only their ports and paths replaced, and the mail courier of
deploy/authapp-courier.service delivering to an SMTP server of the stack's own (aiosmtpd,
`Stack.mailbox`). Used by tests/e2e and bench/.

Every process runs in a process group of its own and is stopped (then killed, if it
must be) by `Stack.stop()`, which checks that none is left. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .mailbox import Mailbox
from .postgres import admin_connection

ROOT = Path(__file__).resolve().parents[1]
UWSGI_INI = ROOT / "uwsgi.ini"
NGINX_CONF = ROOT / "nginx.conf"
STOCK_UWSGI_PARAMS = Path("/etc/nginx/uwsgi_params")
READY = "WSGI app 0 (mountpoint='') ready"
SPAWNED = "spawned uWSGI worker"
STARTING = "*** Starting uWSGI"
# ExecStop's pause in deploy/authapp@.service, between removing the socket and SIGTERM.
DRAIN_SECONDS = 2.0
PASSWORD = "violet-harbor-cactus-42"


def create_database(admin_url: str, name: str) -> str:
    """A new, empty PostgreSQL database on the server of `admin_url`; returns its URL."""
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    with admin_connection(url) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    return url.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy.engine import make_url

    with admin_connection(make_url(admin_url)) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running_stack(admin_url: str, workdir: Path, **options: Any) -> Iterator[Stack]:
    """A stack on a PostgreSQL database of its own; both are gone afterwards."""
    name = f"authapp_e2e_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = create_database(admin_url, name)
    try:
        with Stack(workdir, url, **options).running() as stack:
            yield stack
    finally:
        drop_database(admin_url, name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str:
    """A program from the virtualenv of this Python, else from PATH or /usr/sbin."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed (make e2e installs it)")
    return found


def render_nginx_conf(text: str, *, run_dir: Path, log_dir: Path, www_dir: Path, cert: Path, key: Path,
                      http_port: int, https_port: int, metrics_port: int) -> str:  # fmt: skip
    """nginx.conf with its ports and paths moved to this test's; each must be found."""
    replacements = [
        ("listen 80;", f"listen 127.0.0.1:{http_port};", 1),
        ("listen [::]:80;", "", 1),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;", 1),
        ("listen [::]:443 ssl http2;", "", 1),
        ("listen 127.0.0.1:9180;", f"listen 127.0.0.1:{metrics_port};", 1),
        ("unix:/run/authapp/", f"unix:{run_dir}/", 4),
        ("/etc/letsencrypt/live/auth.example.com/fullchain.pem", str(cert), 1),
        ("/etc/letsencrypt/live/auth.example.com/privkey.pem", str(key), 1),
        ("/var/log/authapp/", f"{log_dir}/", 3),
        ("/var/www/letsencrypt", str(www_dir), 1),
    ]
    for old, new, count in replacements:
        found = text.count(old)
        if found != count:
            raise AssertionError(f"nginx.conf has {found} x {old!r}, the test expects {count}")
        text = text.replace(old, new)
    return text


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a log file: JSON objects as they are, any other line as {"raw": line}."""
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"raw": line})
    return entries


def _live_members(pgid: int) -> list[int]:
    """Processes of a group that still run (a zombie has closed its sockets already)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False


def _stop_group(process: subprocess.Popen, signum: int, timeout: float) -> None:
    """Signal the group's leader (as systemd's KillMode=mixed does), wait for it, kill what
    is left of its group; no process may remain."""
    pgid = process.pid
    if process.poll() is None:
        process.send_signal(signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _live_members(pgid):
        _signal_group(pgid, signal.SIGKILL)
        process.wait(timeout=10)
        _wait_group_gone(pgid, 10)
    process.wait(timeout=10)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _live_members(pgid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {pgid} survived SIGKILL: {_live_members(pgid)}")
        time.sleep(0.02)


def nginx_main_conf(nginx_dir: Path, log_dir: Path, workers: int, site: Path) -> Path:
    """The main context around a site file (the distribution's nginx.conf in production):
    the smallest that runs it unchanged (workers as root: uWSGI runs as root here)."""
    kinds = (("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"), ("scgi", "scgi"))
    for _, name in kinds:
        (nginx_dir / "temp" / name).mkdir(parents=True, exist_ok=True)
    temp_paths = "\n".join(f"    {kind}_temp_path {nginx_dir}/temp/{name};" for kind, name in kinds)
    main = nginx_dir / "nginx.conf"
    main.write_text(
        "daemon off;\n"
        "master_process on;\n"
        f"worker_processes {workers};\n"
        + ("user root root;\n" if os.geteuid() == 0 else "")
        + f"pid {nginx_dir}/nginx.pid;\n"
        f"error_log {log_dir}/nginx-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    default_type application/octet-stream;\n"
        f"{temp_paths}\n"
        "    access_log off;\n"
        f"    include {site};\n"
        "}\n"
    )
    return main


def start_logged(command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`command` in a process group of its own, its output (both streams) appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_nginx(main: Path, nginx_dir: Path, log_dir: Path, port: int) -> subprocess.Popen:
    """nginx from `main` (checked with -t first), in a process group of its own, once it
    listens on `port`."""
    command = [find_binary("nginx"), "-p", f"{nginx_dir}/", "-e", f"{log_dir}/nginx-error.log", "-c"]
    check = subprocess.run([*command, str(main), "-t"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise RuntimeError("nginx -t failed:\n" + check.stderr)
    with (log_dir / "nginx-stderr.log").open("ab") as stderr:
        nginx = subprocess.Popen(
            [*command, str(main)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if nginx.poll() is not None:
            raise RuntimeError("nginx exited:\n" + (log_dir / "nginx-error.log").read_text()[-4000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return nginx
        except OSError:
            time.sleep(0.05)
    _stop_group(nginx, signal.SIGQUIT, 15)
    raise TimeoutError("nginx did not listen")


@dataclass
class Instance:
    number: int
    socket: Path
    metrics_dir: Path
    log: Path
    process: subprocess.Popen | None = None

    def log_entries(self) -> list[dict[str, Any]]:
        return json_lines(self.log) if self.log.exists() else []

    def ready_workers(self) -> tuple[int, int]:
        """(workers spawned, workers whose app is loaded) since the instance last started."""
        # uWSGI's own lines are plain text (an ini with a JSON-wrapping logger: "message")
        messages = [e.get("raw") or e.get("message") or "" for e in self.log_entries()]
        starts = [i for i, m in enumerate(messages) if m.startswith(STARTING)]
        messages = messages[starts[-1] :] if starts else []
        return sum(m.startswith(SPAWNED) for m in messages), sum(READY in m for m in messages)


@dataclass
class Stack:
    workdir: Path
    database_url: str
    instances: int = 3
    env: Mapping[str, str] = field(default_factory=dict)
    uwsgi_args: tuple[str, ...] = ()
    nginx_workers: int = 1
    root: Path = ROOT  # the tree whose app, uwsgi.ini and nginx.conf run (bench: another commit's)
    ini: Path | None = None  # default: the root's uwsgi.ini
    started: list[Instance] = field(default_factory=list)
    nginx: subprocess.Popen | None = None
    courier: subprocess.Popen | None = None
    mailbox: Mailbox = field(default_factory=Mailbox)

    def __post_init__(self) -> None:
        self.ini = self.ini or self.root / UWSGI_INI.name
        self.run_dir = self.workdir / "run"
        self.log_dir = self.workdir / "logs"
        self.nginx_dir = self.workdir / "nginx"
        for directory in (self.run_dir, self.log_dir, self.nginx_dir, self.workdir / "www"):
            directory.mkdir(parents=True, exist_ok=True)
        self.http_port, self.https_port, self.metrics_port = free_port(), free_port(), free_port()
        self.instance = {
            n: Instance(
                n,
                socket=self.run_dir / str(n) / "uwsgi.sock",
                metrics_dir=self.run_dir / str(n) / "metrics",
                log=self.log_dir / f"uwsgi-{n}.log",
            )
            for n in range(1, self.instances + 1)
        }
        self.cert, self.key = self_signed_certificate(self.nginx_dir)

    # -- addresses ------------------------------------------------------------------------

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metrics_url(self, number: int) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics/{number}"

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    @property
    def access_log(self) -> Path:
        return self.log_dir / "nginx-access.log"

    def read_access_log(self) -> list[dict[str, Any]]:
        return json_lines(self.access_log) if self.access_log.exists() else []

    # -- the app ----------------------------------------------------------------------------

    def app_env(self) -> dict[str, str]:
        """The environment of a process of the app: the machine's basics and the settings."""
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ")}
        return {
            **base,
            "ENVIRONMENT": "production",
            "DATABASE_URL": self.database_url,
            "JWT_SECRET_KEY": "e2e-" + "k" * 60,
            "RATELIMIT_ENABLED": "false",
            "LOG_LEVEL": "INFO",
            # Production requires real mail settings: the stack's own SMTP server.
            "MAIL_URL": self.mailbox.url,
            "MAIL_FROM": "authapp <no-reply@example.com>",
            "FRONTEND_URL": "https://app.example.com",
            **self.env,
        }

    def migrate(self) -> None:
        """The release step of docs/deployment.md: `flask --app wsgi db upgrade`; with a key pair
        algorithm, a first signing key too (docs/signing-keys.md)."""
        flask = [find_binary("flask"), "--app", "wsgi"]
        options = {"cwd": self.root, "env": self.app_env(), "check": True, "capture_output": True, "timeout": 120}
        subprocess.run([*flask, "db", "upgrade"], **options)
        if self.app_env().get("JWT_ALGORITHM", "HS256").upper().startswith("HS"):
            return
        listed = subprocess.run([*flask, "keys", "list"], text=True, **options).stdout
        if "\tactive\t" not in listed:
            subprocess.run([*flask, "keys", "generate", "--activate"], **options)

    def start_instance(self, number: int) -> Instance:
        instance = self.instance[number]
        # As systemd's RuntimeDirectory= (deploy/authapp@.service): empty at each start.
        runtime = instance.socket.parent
        if runtime.exists():
            shutil.rmtree(runtime)
        instance.metrics_dir.mkdir(parents=True)
        env = {
            **self.app_env(),
            "AUTHAPP_SOCKET": str(instance.socket),
            "PROMETHEUS_MULTIPROC_DIR": str(instance.metrics_dir),
        }
        command = [find_binary("uwsgi"), "--ini", str(self.ini), *self.uwsgi_args]
        instance.process = start_logged(command, instance.log, self.workdir, env)
        if instance not in self.started:
            self.started.append(instance)
        return instance

    def wait_ready(self, number: int, timeout: float = 120) -> None:
        """Until every worker of the instance has loaded the app."""
        instance = self.instance[number]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if instance.process is not None and instance.process.poll() is not None:
                raise RuntimeError(f"uWSGI instance {number} exited:\n" + instance.log.read_text()[-4000:])
            spawned, ready = instance.ready_workers()
            if spawned and ready >= spawned:
                return
            time.sleep(0.1)
        raise TimeoutError(f"uWSGI instance {number} not ready:\n" + instance.log.read_text()[-4000:])

    def kill_instance(self, number: int) -> None:
        """A crash: SIGKILL to the master and every worker at once (no graceful anything)."""
        process = self.instance[number].process
        assert process is not None
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        _wait_group_gone(process.pid, 10)

    def stop_instance(self, number: int, drain: float = DRAIN_SECONDS, timeout: float = 40) -> int:
        """`systemctl stop authapp@N` as deploy/authapp@.service does it: remove the socket's
        name (nginx can connect no more and fails over at once), let the workers finish
        what was queued for `drain` seconds, then SIGTERM to the master only (graceful, see
        uwsgi.ini; KillMode=mixed). Returns uWSGI's exit status."""
        instance = self.instance[number]
        assert instance.process is not None
        if drain:
            instance.socket.unlink(missing_ok=True)
            time.sleep(drain)
        _stop_group(instance.process, signal.SIGTERM, timeout)
        return instance.process.returncode

    # -- the mail courier -------------------------------------------------------------------

    @property
    def courier_log(self) -> Path:
        return self.log_dir / "courier.log"

    def start_courier(self) -> None:
        """deploy/authapp-courier.service's command, delivering to `mailbox`."""
        command = [find_binary("flask"), "--app", "wsgi", "mail", "courier", "--poll", "0.2"]
        self.courier = start_logged(command, self.courier_log, self.root, self.app_env())

    def stop_courier(self, timeout: float = 30) -> int:
        """`systemctl stop authapp-courier`: SIGTERM; returns its exit status."""
        assert self.courier is not None
        _stop_group(self.courier, signal.SIGTERM, timeout)
        return self.courier.returncode

    # -- nginx ------------------------------------------------------------------------------

    def write_nginx_conf(self) -> Path:
        site = render_nginx_conf(
            (self.root / NGINX_CONF.name).read_text(),
            run_dir=self.run_dir,
            log_dir=self.log_dir,
            www_dir=self.workdir / "www",
            cert=self.cert,
            key=self.key,
            http_port=self.http_port,
            https_port=self.https_port,
            metrics_port=self.metrics_port,
        )
        (self.nginx_dir / "authapp.conf").write_text(site)
        shutil.copyfile(STOCK_UWSGI_PARAMS, self.nginx_dir / "uwsgi_params")
        return nginx_main_conf(self.nginx_dir, self.log_dir, self.nginx_workers, self.nginx_dir / "authapp.conf")

    def start_nginx(self) -> None:
        self.nginx = start_nginx(self.write_nginx_conf(), self.nginx_dir, self.log_dir, self.https_port)

    # -- all of it ------------------------------------------------------------------------

    def start(self) -> Stack:
        try:
            self.mailbox.start()
            self.migrate()
            self.start_courier()
            for number in self.instance:
                self.start_instance(number)
            self.start_nginx()
            for number in self.instance:
                self.wait_ready(number)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        errors = []
        if self.nginx is not None:
            try:
                _stop_group(self.nginx, signal.SIGQUIT, 15)
            except Exception as exc:  # keep stopping the others; report at the end
                errors.append(exc)
        for instance in self.started:
            if instance.process is not None:
                try:
                    _stop_group(instance.process, signal.SIGTERM, 40)
                except Exception as exc:
                    errors.append(exc)
        if self.courier is not None and self.courier.returncode is None:
            try:
                _stop_group(self.courier, signal.SIGTERM, 30)
            except Exception as exc:
                errors.append(exc)
        self.mailbox.stop()
        if errors:
            raise errors[0]

    @contextmanager
    def running(self) -> Iterator[Stack]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


# -- An HTTP client with nothing hidden: http.client, one connection per call ---------------


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    url: str,
    method: str = "GET",
    path: str = "",
    *,
    json_body: Any = None,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    source_address: str | None = None,
    timeout: float = 30,
) -> Reply:
    """One request to `url` + `path` from `source_address` (a loopback address)."""
    parts = urlsplit(url)
    path = (parts.path.rstrip("/") + path) if parts.path else path
    source = (source_address, 0) if source_address else None
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=tls, source_address=source
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout, source_address=source)
    all_headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


# -- Traffic: client threads on keep-alive connections, every outcome recorded -------------


@dataclass
class Outcome:
    thread: int
    method: str
    path: str
    started: float
    ended: float
    status: int | None
    error: str | None = None
    request_id: str | None = None


def traffic(
    url: str,
    requests: list[tuple[str, str, Any, Mapping[str, str]]],
    *,
    threads: int,
    seconds: float,
    tls: ssl.SSLContext | None = None,
    max_requests: int = 100_000,
) -> list[Outcome]:
    """Each thread sends `requests` (method, path, JSON body, headers) round and round for
    `seconds` (and at most `max_requests` in all), reconnecting after any error."""
    import threading

    parts = urlsplit(url)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def connect() -> http.client.HTTPConnection:
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30, context=tls)
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def run(number: int) -> None:
        connection = connect()
        index = number
        while time.monotonic() < deadline:
            with lock:
                if len(outcomes) >= max_requests:
                    break
            method, path, body, headers = requests[index % len(requests)]
            index += 1
            payload = None if body is None else json.dumps(body).encode()
            all_headers = {**headers, **({"Content-Type": "application/json"} if payload else {})}
            started = time.monotonic()
            try:
                connection.request(method, path, body=payload, headers=all_headers)
                response = connection.getresponse()
                response.read()
                outcome = Outcome(number, method, path, started, time.monotonic(), response.status,
                                  request_id=response.headers.get("X-Request-ID"))  # fmt: skip
                if response.headers.get("Connection", "").lower() == "close":
                    connection.close()
                    connection = connect()
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(number, method, path, started, time.monotonic(), None, repr(exc))
                connection.close()
                connection = connect()
            with lock:
                outcomes.append(outcome)
        connection.close()

    workers = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=seconds + 60)
    return outcomes


@dataclass
class Api:
    """The API at one base URL (nginx's HTTPS server here)."""

    stack: Stack
    base_url: str

    def __call__(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Reply:
        headers = dict(kwargs.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return call(self.base_url, method, path, headers=headers, tls=self.stack.tls_context(), **kwargs)

    def register(self, **kwargs: Any) -> dict[str, Any]:
        name = f"user{uuid.uuid4().hex[:10]}"
        reply = self(
            "POST",
            "/auth/register",
            json_body={"email": f"{name}@example.com", "username": name, "password": PASSWORD},
            **kwargs,
        )
        assert reply.status == 201, reply.body
        return {**reply.json(), "username": name}


def app_log_entry(line: str) -> dict:
    """One of the app's JSON log lines as a dict ({} for anything else uWSGI wrote)."""
    if not line.startswith("{"):
        return {}
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}
