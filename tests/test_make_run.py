"""A new user's first command: `make run` on a clean copy of the repository serves /health,
with the mail courier beside the server printing each message (MAIL_URL=console:)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_copy(dest: Path) -> None:
    """The files a fresh clone would have: tracked plus new, not ignored ones."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.mark.slow
def test_make_run_on_a_clean_copy(tmp_path):
    clean_copy(tmp_path)
    assert not (tmp_path / ".venv").exists()
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "JWT_SECRET_KEY", "ENVIRONMENT", "VIRTUAL_ENV", "FLASK_APP")
    }
    log = (tmp_path / "make-run.log").open("w")
    process = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    status = response.status
                    break
            except OSError:
                time.sleep(1)
        assert status == 200, (tmp_path / "make-run.log").read_text()[-3000:]
        assert (tmp_path / "instance" / "authapp.db").exists()
        # The courier runs: a registration's verification link is printed to the console.
        account = {"email": "newcomer@example.com", "username": "newcomer", "password": "violet-harbor-cactus-42"}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/auth/register",
            data=json.dumps(account).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 201
        link = re.compile(r"http://127\.0\.0\.1:8000/verify-email#token=[A-Za-z0-9_-]{43}")
        deadline = time.monotonic() + 60
        while not link.search((tmp_path / "make-run.log").read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert link.search((tmp_path / "make-run.log").read_text()), (tmp_path / "make-run.log").read_text()[-3000:]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    # Stopping make stopped the courier too: no process of the copy is left.
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"{tmp_path}/.venv/bin/flask"], capture_output=True, text=True).stdout
    assert left.strip() == "", left
