"""docs/deployment.md and docs/operations.md agree with deploy/install.sh, and the commands
they give do what they say."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
DEPLOYMENT = ROOT / "docs" / "deployment.md"
OPERATIONS = ROOT / "docs" / "operations.md"


def test_install_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_install_script_passes_shellcheck():
    result = subprocess.run(
        ["shellcheck", "--severity=warning", str(INSTALL)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_every_knob_of_the_script_is_documented_and_no_other():
    script = set(re.findall(r"\$\{(AUTHAPP_[A-Z_]+):", INSTALL.read_text()))
    table = DEPLOYMENT.read_text().split("### Settings of the script", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(AUTHAPP_[A-Z_]+)`", table))
    assert script and script == documented, (sorted(script - documented), sorted(documented - script))


def test_docs_give_the_scripts_commands():
    text = DEPLOYMENT.read_text()
    assert "/srv/authapp/deploy/install.sh" in text
    assert "git -C /srv/authapp pull --ff-only && /srv/authapp/deploy/install.sh" in text
    assert "git -C /srv/authapp pull --ff-only && /srv/authapp/deploy/install.sh" in OPERATIONS.read_text()


def test_restore_command_points_database_url_at_the_restored_database(tmp_path):
    command = next(
        line for line in OPERATIONS.read_text().splitlines() if line.startswith("sed -i 's|^\\(DATABASE_URL")
    )
    settings = tmp_path / "authapp.env"
    settings.write_text(
        "ENVIRONMENT=production\nDATABASE_URL=postgresql://authapp:s3cret-authapp@127.0.0.1:5432/authapp\n"
    )
    command = command.replace("/etc/authapp/authapp.env", str(settings))
    subprocess.run(["sh", "-c", command], check=True, timeout=30)
    assert settings.read_text().splitlines()[1] == (
        "DATABASE_URL=postgresql://authapp:s3cret-authapp@127.0.0.1:5432/authapp_restored"
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_backup_units_in_the_docs_are_valid(tmp_path):
    block = re.search(r"```ini\n(.*?)```", OPERATIONS.read_text(), re.S).group(1)
    parts = re.split(r"^# /etc/systemd/system/(\S+)\n", block, flags=re.M)
    names = parts[1::2]
    assert names == ["authapp-backup.service", "authapp-backup.timer"]
    for name, body in zip(names, parts[2::2], strict=True):
        (tmp_path / name).write_text(body)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
