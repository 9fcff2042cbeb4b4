"""docs/deployment.md and docs/operations.md agree with deploy/install.sh, and the commands
they give do what they say."""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
from email.utils import parseaddr
from pathlib import Path

import pytest

from config import build_flask_config, load_settings

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
DEPLOYMENT = ROOT / "docs" / "deployment.md"
OPERATIONS = ROOT / "docs" / "operations.md"
# systemd's own reader of environment files (the one EnvironmentFile= uses, with `$`
# expanded, which the settings file's format leaves out): it prints what it read.
ENVIRONMENT_D_GENERATOR = Path("/usr/lib/systemd/user-environment-generators/30-systemd-environment-d-generator")
SENDER = "Example <no-reply@example.com>"
GOOD_MAIL = {
    "AUTHAPP_MAIL_URL": "smtp+starttls://apikey:s3cret@smtp.example.com:587",
    "AUTHAPP_MAIL_FROM": SENDER,
    "AUTHAPP_FRONTEND_URL": "https://app.example.com",
}


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


def test_every_knob_of_the_script_is_documented_and_no_other(tmp_path):
    script = set(re.findall(r"\$\{(AUTHAPP_[A-Z_]+):", INSTALL.read_text()))
    script |= {f"AUTHAPP_{name}" for name in script_array(tmp_path, "NEW_FILE_NEEDS")}  # read as ${!given}
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


# -- The first install: what it needs, checked before anything is installed --------------


def sandbox(tmp_path: Path, *, source: str | None = None, args: tuple[str, ...] = (), **knobs: str):
    """deploy/install.sh as root would run it, whole, or sourced and then `source` run
    (the script's functions, none of its steps). Either way from a copy of the script, under
    AUTHAPP_PREFIX=tmp_path, and with a PATH of only the commands its checks and settings
    writer use: without git, the packages step stops it, so whatever the script does before
    that (a check that lets too much through, a step run on sourcing) cannot change this
    machine."""
    script = tmp_path / "checkout" / "deploy" / "install.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(INSTALL, script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for command in ("bash", "dirname", "head", "base64", "tr", "sed", "tail"):
        if not (bin_dir / command).exists():
            (bin_dir / command).symlink_to(shutil.which(command))
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")  # root, whoever runs the test
    (bin_dir / "id").chmod(0o755)
    env = {"PATH": str(bin_dir), "LANG": "C.UTF-8", "AUTHAPP_PREFIX": str(tmp_path / "root"),
           "AUTHAPP_APT": "no", "AUTHAPP_SYSTEMD": "no", **knobs}  # fmt: skip
    command = [str(bin_dir / "bash"), str(script)]
    if source is not None:
        # $0 is not the script, so that the script sees itself sourced
        command = [str(bin_dir / "bash"), "-c", f'. "$1"; shift; {source}', "bash", str(script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def script_array(tmp_path: Path, name: str) -> list[str]:
    """An array of deploy/install.sh, read by sourcing it."""
    result = sandbox(tmp_path, source=f'printf "%s\\n" "${{{name}[@]}}"')
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
    return result.stdout.split()


def assert_stopped_before_installing(result: subprocess.CompletedProcess) -> str:
    """The one line the script stopped with, before any step began."""
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.startswith("install.sh: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def assert_went_past_the_checks(result: subprocess.CompletedProcess) -> None:
    # The packages step began, and only the sandbox's PATH (no git) stopped it.
    assert result.stdout.startswith("\n==> packages\n"), result.stdout + result.stderr
    assert result.stderr.startswith("install.sh: git is missing"), result.stderr


def test_a_first_install_without_the_mail_settings_stops_before_installing_anything(tmp_path):
    needs = [f"AUTHAPP_{name}" for name in script_array(tmp_path, "NEW_FILE_NEEDS")]
    assert needs == ["AUTHAPP_MAIL_URL", "AUTHAPP_MAIL_FROM", "AUTHAPP_FRONTEND_URL"]
    # The command the docs gave: stopped after minutes of packages and virtualenv.
    line = assert_stopped_before_installing(sandbox(tmp_path, AUTHAPP_DOMAIN="auth.example.com"))
    assert f"a new settings file needs {' '.join(needs)}: give them" in line
    # Only what is missing is named; a setting of AUTHAPP_SETTINGS counts.
    line = assert_stopped_before_installing(
        sandbox(tmp_path, AUTHAPP_MAIL_URL="smtp://127.0.0.1:25", AUTHAPP_SETTINGS="FRONTEND_URL=https://a.example.com")
    )
    assert "needs AUTHAPP_MAIL_FROM: give them" in line
    line = assert_stopped_before_installing(sandbox(tmp_path, **GOOD_MAIL, AUTHAPP_LOCAL_POSTGRES="no"))
    assert "needs AUTHAPP_DATABASE_URL: give them" in line
    assert_went_past_the_checks(sandbox(tmp_path, **GOOD_MAIL))


def test_the_documented_first_install_commands_give_what_a_new_settings_file_needs(tmp_path):
    section = DEPLOYMENT.read_text().split("\n## First install\n", 1)[1].split("\n## ", 1)[0]
    lines = "".join(re.findall(r"```sh\n(.*?)```", section, re.S)).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if "deploy/install.sh" in line]
    assert len(commands) == 2, lines  # self-signed, then Let's Encrypt
    needs = {f"AUTHAPP_{name}" for name in script_array(tmp_path, "NEW_FILE_NEEDS")}
    for words in commands:
        assignments = list(itertools.takewhile(lambda word: re.match(r"^AUTHAPP_[A-Z_]+=", word), words))
        assert words[len(assignments) :] == ["/srv/authapp/deploy/install.sh"], words
        knobs = dict(word.split("=", 1) for word in assignments)
        assert needs <= knobs.keys(), sorted(needs - knobs.keys())
        # As given, the values pass every check the script makes before installing.
        assert_went_past_the_checks(sandbox(tmp_path, **knobs))


@pytest.mark.parametrize(
    ("knob", "value", "named"),
    [
        ("AUTHAPP_MAIL_URL", "smtp+starttls://apikey:pa$$word@smtp.example.com:587", "MAIL_URL"),
        ("AUTHAPP_MAIL_FROM", 'Example "Team" <no-reply@example.com>', "MAIL_FROM"),
        ("AUTHAPP_SETTINGS", "CORS_ORIGINS=https://`app`.example.com", "CORS_ORIGINS"),
    ],
)
def test_a_value_the_settings_file_cannot_hold_stops_before_installing_anything(tmp_path, knob, value, named):
    line = assert_stopped_before_installing(sandbox(tmp_path, **{**GOOD_MAIL, knob: value}))
    assert line.startswith(f"install.sh: {named}: the settings file cannot hold a value with"), line
    assert value.split("=")[-1] not in line and "pa$$word" not in line  # the value may be a secret


# -- The settings file: one format that systemd and sh read alike ------------------------


def written_settings(tmp_path: Path, *lines: str) -> Path:
    """The settings file install.sh writes for a first install with GOOD_MAIL (a sender
    with a display name), then `lines` through its writer, checked by its checker."""
    env_file = tmp_path / "authapp.env"
    body = 'ENV_FILE="$1"; { new_settings; for l in "${@:2}"; do setting_line "$l"; done; } >"$1"; check_env_file'
    result = sandbox(tmp_path, source=body, args=(str(env_file), *lines),
                     **GOOD_MAIL, AUTHAPP_SETTINGS="CORS_ORIGINS=https://app.example.com")  # fmt: skip
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    return env_file


def keys_of(env_file: Path) -> list[str]:
    return re.findall(r"^([A-Z][A-Z0-9_]*)=", env_file.read_text(), re.M)


def read_by_sh(env_file: Path) -> dict[str, str]:
    """The settings as the migration and an operator's flask command get them."""
    result = subprocess.run(
        ["sh", "-c", 'set -a; . "$0"; exec env -0', str(env_file)],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    seen = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
    return {key: seen[key] for key in keys_of(env_file)}


def read_by_systemd(env_file: Path, tmp_path: Path) -> dict[str, str]:
    """The settings as systemd's environment file parser reads them: the environment.d
    generator reads the file with it and prints each variable, shell-quoted if needed."""
    folder = tmp_path / "xdg" / "environment.d"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(env_file, folder / "50-authapp.conf")
    result = subprocess.run(
        [str(ENVIRONMENT_D_GENERATOR)], env={"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": "/nonexistent"},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    seen = {}
    for line in result.stdout.splitlines():
        key, value = line.split("=", 1)
        seen[key] = "".join(shlex.split(value))
    return {key: seen[key] for key in keys_of(env_file)}


# Every character the two forms allow (a bare value; a double-quoted one).
EDGE_LINES = ("BARE_EDGE=aZ09_@:/.,+%=?!*-", "QUOTED_EDGE= a b'c;d&e|f(g)h#i<j>k~l{m}n[o]p^q ")


def test_the_written_settings_hold_a_sender_with_its_display_name(tmp_path):
    env_file = written_settings(tmp_path, *EDGE_LINES)
    assert f'MAIL_FROM="{SENDER}"' in env_file.read_text().splitlines()
    settings = read_by_sh(env_file)
    assert settings["MAIL_FROM"] == SENDER
    assert settings["QUOTED_EDGE"] == EDGE_LINES[1].split("=", 1)[1]
    assert settings["BARE_EDGE"] == EDGE_LINES[0].split("=", 1)[1]
    # authapp takes the file as production does; the messages call the service "Example".
    config = build_flask_config(load_settings(settings))
    assert config["MAIL_FROM"] == SENDER and parseaddr(config["MAIL_FROM"])[0] == "Example"


@pytest.mark.skipif(not ENVIRONMENT_D_GENERATOR.exists(), reason="needs systemd (its environment.d generator)")
def test_systemd_and_sh_read_the_written_settings_alike(tmp_path):
    env_file = written_settings(tmp_path, *EDGE_LINES)
    by_sh = read_by_sh(env_file)
    assert read_by_systemd(env_file, tmp_path) == by_sh and by_sh["MAIL_FROM"] == SENDER


@pytest.mark.skipif(not ENVIRONMENT_D_GENERATOR.exists(), reason="needs systemd (its environment.d generator)")
def test_the_settings_examples_pass_the_check_and_read_alike(tmp_path):
    email = (ROOT / "docs" / "email.md").read_text()
    relay = next(block for block in re.findall(r"```\n(.*?)```", email, re.S) if block.startswith("MAIL_URL="))
    (tmp_path / "relay.env").write_text(relay)
    for env_file in (ROOT / "deploy" / "authapp.env.example", tmp_path / "relay.env"):
        checked = sandbox(tmp_path, source='ENV_FILE="$1"; check_env_file', args=(str(env_file),))
        assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr
        by_sh = read_by_sh(env_file)
        assert read_by_systemd(env_file, tmp_path) == by_sh, env_file
        assert by_sh["MAIL_FROM"] == SENDER and load_settings(by_sh)["MAIL_FROM"] == SENDER
