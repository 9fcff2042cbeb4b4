"""deploy/: the systemd units are valid and agree with nginx.conf and uwsgi.ini, and the
logrotate file rotates nginx's logs of a running nginx."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from devtools.stack import NGINX_CONF, ROOT, UWSGI_INI, Api, find_binary, json_lines, running_stack

DEPLOY = ROOT / "deploy"
UNITS = ["authapp@.service", "authapp-prune.service", "authapp-prune.timer"]


def unit_values(name: str, key: str) -> list[str]:
    text = (DEPLOY / name).read_text()
    return [m.group(1).strip() for m in re.finditer(rf"^{key}=(.*)$", text, re.M)]


def test_units_nginx_and_uwsgi_agree():
    environment = dict(v.split("=", 1) for v in unit_values("authapp@.service", "Environment"))
    nginx = NGINX_CONF.read_text()
    upstream = re.findall(r"^\s*server (unix:\S+)", nginx, re.M)
    assert upstream == [f"unix:{environment['AUTHAPP_SOCKET'].replace('%i', str(n))}" for n in (1, 2, 3)]
    # The socket and the metrics directory live in the runtime directories systemd makes
    # (empty) at each start; the metrics listener reaches every instance's socket.
    runtime = unit_values("authapp@.service", "RuntimeDirectory")[0].split()
    assert environment["AUTHAPP_SOCKET"] == f"/run/{runtime[0]}/uwsgi.sock"
    assert environment["PROMETHEUS_MULTIPROC_DIR"] == f"/run/{runtime[1]}"
    assert "uwsgi_pass unix:/run/authapp/$authapp_instance/uwsgi.sock;" in nginx
    # uwsgi.ini's default socket is instance 1's.
    assert "socket = /run/authapp/1/uwsgi.sock" in UWSGI_INI.read_text()
    # systemd waits longer for a graceful stop than uWSGI gives its workers.
    mercy = int(re.search(r"^worker-reload-mercy = (\d+)$", UWSGI_INI.read_text(), re.M).group(1))
    assert int(unit_values("authapp@.service", "TimeoutStopSec")[0]) > mercy + 2
    # nginx waits for a request longer than uWSGI lets it run.
    harakiri = int(re.search(r"^harakiri = (\d+)$", UWSGI_INI.read_text(), re.M).group(1))
    read_timeout = int(re.search(r"uwsgi_read_timeout (\d+)s;", nginx).group(1))
    assert harakiri < read_timeout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_are_valid(tmp_path):
    """`systemd-analyze verify` on the units, their paths moved to this checkout."""
    env = tmp_path / "authapp.env"
    env.write_text("ENVIRONMENT=production\n")
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        text = text.replace("/srv/authapp", str(ROOT)).replace("/etc/authapp/authapp.env", str(env))
        text = text.replace("User=authapp", "User=root").replace("Group=authapp", "Group=root")
        (tmp_path / name.replace("@.", "@1.")).write_text(text)
    units = [str(tmp_path / name.replace("@.", "@1.")) for name in UNITS]
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_logrotate_rotates_nginx_logs_and_nginx_reopens_them(admin_url, tmp_path):
    with running_stack(admin_url, tmp_path / "stack", instances=1, env={"BCRYPT_ROUNDS": "4"}) as stack:
        api = Api(stack, stack.https_url)
        assert api("GET", "/health/live").status == 200
        config = (DEPLOY / "logrotate-authapp").read_text()
        config = config.replace("/var/log/authapp/", f"{stack.log_dir}/").replace(
            "/run/nginx.pid", str(stack.nginx_dir / "nginx.pid")
        )
        config = config.replace("create 0640 www-data adm", "create 0640 root root")
        (tmp_path / "logrotate.conf").write_text(config)
        result = subprocess.run(
            [find_binary("logrotate"), "--force", "--state", str(tmp_path / "state"), str(tmp_path / "logrotate.conf")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        rotated = stack.log_dir / "nginx-access.log.1"
        assert [e["path"] for e in json_lines(rotated)][-1] == "/health/live"
        reply = api("GET", "/health/live")
        # nginx writes the new request to the new file (it reopened it on SIGUSR1).
        deadline = time.monotonic() + 10
        while not stack.read_access_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["request_id"] for e in stack.read_access_log()] == [reply.headers["X-Request-ID"]]
