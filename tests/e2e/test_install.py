"""deploy/install.sh, run for real: a first install, an upgrade (the same script again), a
pg_dump backup restored into a new database and the app served from it.

The script runs as docs/deployment.md tells an operator to run it, with the knobs it has
for a sandbox: every path under a temporary root (AUTHAPP_PREFIX), loopback ports, no
systemd (this machine runs none: the script starts nginx and the three instances itself,
as the units would, and checks the units with `systemd-analyze verify`), no apt-get (.ci/run
installs the packages). It runs on this machine's nginx, uWSGI (built into the install's
own virtualenv), PostgreSQL and Redis, with a system user, a role and databases of its own,
all removed afterwards.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import os
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from devtools.postgres import admin_connection
from devtools.stack import PASSWORD, ROOT, call, free_port

DOMAIN = "auth.install.test"
# A sender with a display name: the settings file holds it in double quotes.
SENDER = "authapp install test <no-reply@example.com>"
# A first install creates a virtualenv and installs requirements-deploy.txt into it
# (uWSGI from pip's cache once make e2e has built it); a re-run takes about 20 s here.
INSTALL_TIMEOUT = 600


@dataclass
class Installation:
    root: Path
    env: dict[str, str]
    user: str
    database: str
    role: str
    admin_url: str
    redis_url: str
    http_port: int
    https_port: int
    metrics_port: int

    @property
    def app_dir(self) -> Path:
        return self.root / "srv" / "authapp"

    @property
    def env_file(self) -> Path:
        return self.root / "etc" / "authapp" / "authapp.env"

    @property
    def letsencrypt_live(self) -> Path:
        return self.root / "etc" / "letsencrypt" / "live" / DOMAIN

    def install(self, check: bool = True, **knobs: str) -> subprocess.CompletedProcess:
        """`deploy/install.sh`, the command the docs give, from the installed checkout."""
        result = subprocess.run(
            [str(self.app_dir / "deploy" / "install.sh")],
            cwd="/",
            env={**self.env, **knobs},
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
        if check:
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return result

    def tls(self) -> ssl.SSLContext:
        """Trusts the install's own certificate, and Let's Encrypt's once there is one (they
        name DOMAIN; requests go to 127.0.0.1)."""
        context = ssl.create_default_context(cafile=str(self.root / "etc/authapp/tls/fullchain.pem"))
        if (self.letsencrypt_live / "fullchain.pem").exists():
            context.load_verify_locations(cafile=str(self.letsencrypt_live / "fullchain.pem"))
        context.check_hostname = False
        return context

    def api(self, method: str, path: str, token: str | None = None, **kwargs):
        headers = {"Host": DOMAIN, **({"Authorization": f"Bearer {token}"} if token else {})}
        return call(f"https://127.0.0.1:{self.https_port}", method, path, headers=headers, tls=self.tls(), **kwargs)

    def instance_pids(self) -> dict[int, int]:
        folder = self.root / "run" / "authapp-install"
        return {int(p.stem): int(p.read_text()) for p in folder.glob("*.pid")}

    def setting(self, name: str) -> str:
        return re.search(rf"^{name}=(.*)$", self.env_file.read_text(), re.M).group(1)


def _copy_checkout(target: Path) -> None:
    """The checkout as `git clone` would give it, with this worktree's changes."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            destination = target / os.fsdecode(name)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def _stop_pid(pid: int, signum: int, timeout: float = 45) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _sql(admin_url: str, *statements: str) -> None:
    with admin_connection(make_url(admin_url)) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)


def _teardown(inst: Installation) -> None:
    for pid in inst.instance_pids().values():
        _stop_pid(pid, signal.SIGTERM)
    nginx_pid = inst.root / "run" / "nginx.pid"
    if nginx_pid.exists():
        _stop_pid(int(nginx_pid.read_text()), signal.SIGQUIT, 15)
    _sql(
        inst.admin_url,
        f'DROP DATABASE IF EXISTS "{inst.database}" WITH (FORCE)',
        f'DROP DATABASE IF EXISTS "{inst.database}_restored" WITH (FORCE)',
        f'DROP ROLE IF EXISTS "{inst.role}"',
    )
    prefix = inst.env["AUTHAPP_SETTINGS"].split("RATELIMIT_KEY_PREFIX=")[1].split()[0]
    redis = ["redis-cli", "-u", inst.redis_url]
    keys = subprocess.run([*redis, "--scan", "--pattern", f"{prefix}*"], capture_output=True, text=True, timeout=30)
    for key in keys.stdout.split():
        subprocess.run([*redis, "DEL", key], capture_output=True, timeout=30)
    nginx_user = inst.env["AUTHAPP_NGINX_USER"]
    subprocess.run(["gpasswd", "-d", nginx_user, inst.user], capture_output=True, timeout=30)
    subprocess.run(["deluser", "--system", "--quiet", inst.user], capture_output=True, timeout=30)
    subprocess.run(["delgroup", "--system", "--quiet", inst.user], capture_output=True, timeout=30)
    shutil.rmtree(inst.root, ignore_errors=True)


@pytest.fixture(scope="module")
def installation(admin_url) -> Iterator[Installation]:
    if os.geteuid() != 0:
        pytest.fail("deploy/install.sh runs as root (it makes a system user): run make e2e as root")
    for tool in ("setpriv", "adduser", "pg_dump", "pg_restore", "redis-cli", "systemd-analyze"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            pytest.fail(f"{tool} is missing (.ci/run installs what make e2e needs)")
    # Not under pytest's tmp_path: that is mode 0700, and the service user must read the code.
    root = Path(tempfile.mkdtemp(prefix="authapp-install-"))
    root.chmod(0o755)
    _copy_checkout(root / "srv" / "authapp")
    tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = make_url(admin_url)
    redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    ports = free_port(), free_port(), free_port()
    user = f"authapp-t{os.getpid()}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "AUTHAPP_PREFIX": str(root),
        "AUTHAPP_SYSTEMD": "no",
        "AUTHAPP_APT": "no",
        "AUTHAPP_DOMAIN": DOMAIN,
        "AUTHAPP_USER": user,
        "AUTHAPP_NGINX_USER": "www-data",
        "AUTHAPP_DB_NAME": f"authapp_install_{tag}",
        "AUTHAPP_DB_USER": f"authapp_install_{tag}",
        "AUTHAPP_PG_HOST": url.host or "127.0.0.1",
        "AUTHAPP_PG_PORT": str(url.port or 5432),
        "AUTHAPP_PG_ADMIN_URL": url.set(drivername="postgresql").render_as_string(hide_password=False),
        "AUTHAPP_REDIS_URL": redis_url,
        "AUTHAPP_LISTEN_ADDR": "127.0.0.1",
        "AUTHAPP_HTTP_PORT": str(ports[0]),
        "AUTHAPP_HTTPS_PORT": str(ports[1]),
        "AUTHAPP_METRICS_PORT": str(ports[2]),
        "AUTHAPP_WAIT_SECONDS": "90",
        # What a production start needs; nothing is sent (the courier is not started here).
        "AUTHAPP_MAIL_URL": "smtp://127.0.0.1:25",
        "AUTHAPP_MAIL_FROM": SENDER,
        "AUTHAPP_FRONTEND_URL": "https://app.example.com",
        # Its own keys on the shared Redis; bcrypt's cheapest cost keeps the logins quick.
        "AUTHAPP_SETTINGS": f"RATELIMIT_KEY_PREFIX=authapp-install-{tag}- BCRYPT_ROUNDS=4",
    }
    inst = Installation(root, env, user, env["AUTHAPP_DB_NAME"], env["AUTHAPP_DB_USER"],
                        admin_url, redis_url, *ports)  # fmt: skip
    try:
        inst.first_run = inst.install()
        yield inst
    finally:
        _teardown(inst)


def _register(inst: Installation, name: str) -> dict:
    reply = inst.api(
        "POST",
        "/auth/register",
        json_body={"email": f"{name}@example.com", "username": name, "password": PASSWORD},
    )
    assert reply.status == 201, reply.body
    return reply.json()


def _login(inst: Installation, name: str):
    return inst.api("POST", "/auth/login", json_body={"username": name, "password": PASSWORD})


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))


def test_first_install_serves_https(installation):
    inst = installation
    out = inst.first_run.stdout
    # The order that makes a first install work: nginx loaded, then migrated, then each
    # instance restarted and waited for on nginx's metrics listener.
    steps = [m.group(1) for m in re.finditer(r"^==> (.*)$", out, re.M)]
    order = [next(i for i, s in enumerate(steps) if s.startswith(p)) for p in
             ("nginx: check and load", "database migrations", "instance 1:", "instance 2:", "instance 3:")]  # fmt: skip
    assert order == sorted(order), steps
    assert "systemd-analyze verify: the units are valid" in out
    health = inst.api("GET", "/health")
    assert health.status == 200 and health.json()["checks"]["database"] == "ok"
    # HTTP redirects to HTTPS; the metrics listener reaches each of the three instances.
    redirect = call(f"http://127.0.0.1:{inst.http_port}", "GET", "/auth/me", headers={"Host": DOMAIN})
    assert redirect.status == 301 and redirect.headers["Location"] == f"https://{DOMAIN}/auth/me"
    for n in (1, 2, 3):
        assert call(f"http://127.0.0.1:{inst.metrics_port}", "GET", f"/metrics/{n}").status == 200
    # The instances run as the system user; the settings are readable by root and its group only.
    uid = pwd.getpwnam(inst.user).pw_uid
    assert sorted(inst.instance_pids()) == [1, 2, 3]
    assert {_uid_of(pid) for pid in inst.instance_pids().values()} == {uid}
    st = inst.env_file.stat()
    assert (st.st_mode & 0o777, st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (0o640, 0, inst.user)
    assert len(inst.setting("JWT_SECRET_KEY")) >= 48
    assert inst.setting("DATABASE_URL").startswith(f"postgresql://{inst.role}:")
    # The sender's display name, in the quoted form (and the instances started with it).
    assert inst.setting("MAIL_FROM") == f'"{SENDER}"'
    # The units, the drop-ins ordering the instances and the courier after the local
    # PostgreSQL and Redis and pulling them in, logrotate.
    units = inst.root / "etc" / "systemd" / "system"
    for dropin in ("authapp@.service.d", "authapp-courier.service.d"):
        lines = (units / dropin / "local.conf").read_text().splitlines()
        assert "Wants=postgresql.service redis-server.service" in lines, dropin
        assert "After=postgresql.service redis-server.service" in lines, dropin
    assert f"EnvironmentFile={inst.env_file}" in (units / "authapp@.service").read_text()
    assert (inst.root / "etc" / "logrotate.d" / "authapp").exists()
    assert (inst.root / "var" / "www" / "letsencrypt").is_dir()


def _scram_is_of(verifier: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier as PostgreSQL stores it
    (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, RFC 5802 and 7677) was
    made from `password` (ASCII here, which SASLprep leaves as it is)."""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    if match is None:
        return False
    iterations, salt, stored_key, server_key = match.groups()
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), base64.b64decode(stored_key)) and (
        hmac.compare_digest(hmac.new(salted, b"Server Key", "sha256").digest(), base64.b64decode(server_key))
    )


def test_the_role_has_the_password_of_the_settings_file(installation):
    """The local PostgreSQL here trusts 127.0.0.1, so a login proves no password: the role's
    stored verifier must be made from DATABASE_URL's password (Debian's PostgreSQL asks for
    it on TCP). Neither is ever printed."""
    inst = installation
    password = make_url(inst.setting("DATABASE_URL")).password or ""
    with admin_connection(make_url(inst.admin_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (inst.role,))
        (verifier,) = cur.fetchone()
    is_scram = (verifier or "").startswith("SCRAM-SHA-256$")
    assert is_scram, "the role has no SCRAM-SHA-256 password"
    matches = len(password) >= 24 and _scram_is_of(verifier, password)
    assert matches, "the role's password is not the one DATABASE_URL carries"


def test_rerun_is_an_upgrade_that_keeps_everything(installation):
    inst = installation
    tokens = _register(inst, "before_upgrade")
    settings = inst.env_file.read_bytes()
    pids = inst.instance_pids()
    started = time.monotonic()
    result = inst.install()
    print(f"re-run of install.sh: {time.monotonic() - started:.1f} s")
    assert "wrote " not in result.stdout  # the settings file is kept, secrets and all
    assert inst.env_file.read_bytes() == settings
    new_pids = inst.instance_pids()
    assert all(new_pids[n] != pids[n] for n in (1, 2, 3))  # every instance restarted
    # Same secret, same database: the session from before the upgrade goes on.
    assert inst.api("GET", "/auth/me", token=tokens["access_token"]).status == 200
    assert _login(inst, "before_upgrade").status == 200


def test_settings_file_in_the_wrong_format_is_refused(installation):
    inst = installation
    good = inst.env_file.read_text()
    try:
        # Single quotes: sh and systemd would agree here, but the format has one quoted form.
        inst.env_file.write_text(good + "MAIL_FROM='authapp <no-reply@example.com>'\n")
        result = inst.install(check=False)
        assert result.returncode == 1
        number = len(good.splitlines()) + 1
        assert f"authapp.env line {number}: write KEY=value (letters, digits and" in result.stderr
    finally:
        inst.env_file.write_text(good)


def test_backup_restore_into_a_new_database_and_serve_it(installation, tmp_path):
    inst = installation
    tokens = _register(inst, "before_backup")
    admin = make_url(inst.admin_url).set(drivername="postgresql")
    dump = tmp_path / "authapp.dump"
    # docs/operations.md, "Backups": pg_dump's custom format of the settings' database.
    subprocess.run(
        ["pg_dump", "--format=custom", f"--file={dump}",
         f"--dbname={admin.set(database=inst.database).render_as_string(hide_password=False)}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    _register(inst, "after_backup")
    # "Restore": a new database owned by the role, pg_restore into it, DATABASE_URL changed
    # to it, install.sh again (it migrates and restarts the instances one at a time).
    restored = f"{inst.database}_restored"
    _sql(inst.admin_url, f'CREATE DATABASE "{restored}" OWNER "{inst.role}"')
    subprocess.run(
        ["pg_restore", "--no-owner", f"--role={inst.role}", "--exit-on-error",
         f"--dbname={admin.set(database=restored).render_as_string(hide_password=False)}", str(dump)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    text = inst.env_file.read_text()
    inst.env_file.write_text(re.sub(rf"/{inst.database}$", f"/{restored}", text, flags=re.M))
    assert inst.setting("DATABASE_URL").endswith(f"/{restored}")
    inst.install()
    # Served from the restored database: what the backup held works, what came later is gone.
    assert inst.api("GET", "/auth/me", token=tokens["access_token"]).json()["username"] == "before_backup"
    assert _login(inst, "before_backup").status == 200
    gone = _login(inst, "after_backup")
    assert gone.status == 401 and gone.json()["error_code"] == "INVALID_CREDENTIALS"
    with admin_connection(admin.set(database=restored)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), current_database() FROM users")
        assert cur.fetchone() == (2, restored)  # before_upgrade and before_backup


STUB_CERTBOT = """#!/bin/sh
# certbot certonly --webroot, stood in for: its arguments noted, a certificate for the
# domain where certbot puts it (CONFIG_DIR/live/DOMAIN/).
echo "$@" >>"{log}"
while [ $# -gt 0 ]; do
    case "$1" in --config-dir) config_dir="$2"; shift ;; -d) domain="$2"; shift ;; esac
    shift
done
if [ -z "$config_dir" ] || [ -z "$domain" ]; then echo "certbot stub: no --config-dir or -d" >&2; exit 1; fi
mkdir -p "$config_dir/live/$domain"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 90 \\
    -subj "/CN=$domain/O=stub certbot" -addext "subjectAltName=DNS:$domain" \\
    -keyout "$config_dir/live/$domain/privkey.pem" -out "$config_dir/live/$domain/fullchain.pem" 2>/dev/null
"""


def _stub(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    (folder / name).chmod(0o755)


def test_lets_encrypt_certificate_replaces_the_self_signed_one(installation, tmp_path):
    """AUTHAPP_CERT=certbot on an installed machine, with a stand-in for certbot: nginx
    serves the new certificate at once, and certbot's renewals will reload nginx."""
    inst = installation
    log = tmp_path / "certbot.log"
    _stub(tmp_path / "bin", "certbot", STUB_CERTBOT.format(log=log))
    letsencrypt = inst.root / "etc" / "letsencrypt"
    inst.install(AUTHAPP_CERT="certbot", AUTHAPP_CERTBOT_EMAIL="ops@example.com",
                 PATH=f"{tmp_path / 'bin'}:{inst.env['PATH']}")  # fmt: skip
    webroot = inst.root / "var" / "www" / "letsencrypt"
    assert log.read_text().split() == [
        "certonly", "--config-dir", str(letsencrypt), "--webroot", "-w", str(webroot), "-d", DOMAIN,
        "--email", "ops@example.com", "--agree-tos", "--non-interactive",
    ]  # fmt: skip
    site = (inst.root / "etc" / "nginx" / "conf.d" / "authapp.conf").read_text()
    assert f"ssl_certificate {inst.letsencrypt_live}/fullchain.pem;" in site
    assert f"ssl_certificate_key {inst.letsencrypt_live}/privkey.pem;" in site
    served = ssl.get_server_certificate(("127.0.0.1", inst.https_port))
    issued = (inst.letsencrypt_live / "fullchain.pem").read_text()
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(issued)
    assert inst.api("GET", "/health").status == 200
    # The renewal hook, run as certbot runs it: nginx checks its files, then reloads.
    hook = letsencrypt / "renewal-hooks" / "deploy" / "authapp-reload-nginx"
    assert hook.stat().st_mode & 0o777 == 0o755
    calls = tmp_path / "calls.log"
    for command in ("nginx", "systemctl"):
        _stub(tmp_path / "hook-bin", command, f'#!/bin/sh\necho "{command} $*" >>"{calls}"\n')
    subprocess.run([str(hook)], env={"PATH": f"{tmp_path / 'hook-bin'}:/usr/bin:/bin"}, check=True, timeout=30)
    assert calls.read_text().splitlines() == ["nginx -t -q", "systemctl reload nginx"]
