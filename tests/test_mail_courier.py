"""`flask mail courier` as a process (delivers until SIGTERM), the outbox in /metrics,
pruning, and the email settings' checks at start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import PASSWORD, SECRET, base_settings, bearer
from sqlalchemy import func, select

from authapp import clock, create_app
from authapp.extensions import db
from authapp.mail import courier
from authapp.models import OneTimeToken, OutboxMessage
from config import ConfigError, build_flask_config, load_settings
from devtools.mailbox import Mailbox

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mailbox():
    with Mailbox() as box:
        yield box


@pytest.fixture
def settings(mailbox):
    return {"MAIL_URL": mailbox.url, "FRONTEND_URL": "https://app.example.com"}


def register(client, name):
    body = {"email": f"{name}@example.com", "username": name, "password": PASSWORD}
    response = client.post("/auth/register", json=body)
    assert response.status_code == 201
    return response.get_json()


@pytest.mark.slow
def test_the_courier_command_delivers_until_sigterm(client, mailbox, database_url, tmp_path):
    register(client, "ann")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "MAIL_", "JWT_"))},
        "ENVIRONMENT": "testing",
        "JWT_SECRET_KEY": SECRET,
        "DATABASE_URL": database_url,
        "MAIL_URL": mailbox.url,
        "FRONTEND_URL": "https://app.example.com",
    }
    log = (tmp_path / "courier.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "mail", "courier", "--poll", "0.1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        mailbox.wait_for(1, timeout=60)
        register(client, "ben")  # queued while the courier runs
        mailbox.wait_for(2, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        log.close()
    output = (tmp_path / "courier.log").read_text()
    assert code == 0, output
    assert "mail_courier_stopped" in output and "#token=" not in output
    assert sorted(m.rcpt_tos[0] for m in mailbox.messages()) == ["ann@example.com", "ben@example.com"]


def metric(client, name: str) -> float:
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_outbox_in_metrics(app, client, mailbox, later):
    assert metric(client, "authapp_mail_outbox_waiting") == 0
    register(client, "ann")
    register(client, "ben")
    assert metric(client, 'authapp_mail_messages_total{outcome="queued"}') == 2
    assert metric(client, "authapp_mail_outbox_waiting") == 2
    later(90)
    assert 89 <= metric(client, "authapp_mail_outbox_oldest_age_seconds") <= 120
    mailbox.refuse = "451 busy"
    with app.app_context():
        courier.Courier(poll_interval=0).deliver_due()
    assert metric(client, 'authapp_mail_messages_total{outcome="retried"}') == 2
    mailbox.refuse = None
    later(3600)
    with app.app_context():
        courier.Courier(poll_interval=0).deliver_due()
    assert metric(client, 'authapp_mail_messages_total{outcome="sent"}') == 2
    assert metric(client, "authapp_mail_outbox_waiting") == 0
    assert metric(client, "authapp_mail_outbox_oldest_age_seconds") == 0
    assert metric(client, 'authapp_mail_messages_total{outcome="given_up"}') == 0


def test_prune_deletes_spent_and_expired_tokens_and_old_finished_messages(app, client, mailbox, monkeypatch):
    tokens = register(client, "ann")
    with app.app_context():
        courier.Courier(poll_interval=0).deliver_due()
    token = mailbox.messages()[-1].token()
    assert client.post("/auth/verify-email", json={"token": token}).status_code == 200  # spent
    client.post(
        "/auth/change-email",
        headers=bearer(tokens["access_token"]),
        json={"new_email": "x@example.com", "current_password": PASSWORD},
    )
    runner = app.test_cli_runner()
    result = runner.invoke(args=["tokens", "prune"])
    assert result.exit_code == 0 and "pruned 1 one-time token(s) and 0 finished outbox message(s)" in result.output
    real = clock.now
    monkeypatch.setattr(clock, "now", lambda: real() + timedelta(days=2))  # past the link's 24 h and the window
    result = runner.invoke(args=["sessions", "prune"])
    assert result.exit_code == 0, result.output
    assert "pruned 1 one-time token(s) and 1 finished outbox message(s)" in result.output
    with app.app_context():
        assert db.session.scalar(select(func.count(OneTimeToken.id))) == 0
        # The two change-of-address messages were never delivered: they stay, queued.
        assert db.session.scalar(select(func.count(OutboxMessage.id))) == 2


# -- Settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ,message",
    [
        ({}, "MAIL_URL is required when ENVIRONMENT=production"),
        ({"MAIL_URL": "console:"}, "MAIL_URL=console: is for development and testing only"),
        ({"MAIL_URL": "smtp://relay"}, "MAIL_FROM is required when ENVIRONMENT=production"),
        ({"MAIL_URL": "smtp://relay", "MAIL_FROM": "a@example.com"}, "FRONTEND_URL is required"),
        ({"MAIL_URL": "http://relay"}, "MAIL_URL must be console: or smtp://"),
        ({"MAIL_URL": "smtp://:pw@/"}, "MAIL_URL must be console: or smtp://"),
        ({"MAIL_FROM": "no address"}, "MAIL_FROM must be an email address"),
        ({"FRONTEND_URL": "https://app.example.com/#x"}, "FRONTEND_URL must be an http(s) URL without a fragment"),
        ({"EMAIL_VERIFICATION": "sometimes"}, "EMAIL_VERIFICATION must be one of off, optional, required"),
        ({"MAIL_RATE_LIMIT": "lots"}, "MAIL_RATE_LIMIT must be a rate limit"),
        ({"PASSWORD_RESET_TOKEN_MINUTES": "0"}, "PASSWORD_RESET_TOKEN_MINUTES must be between 1 and 1440"),
        ({"MAIL_TEMPLATES_DIR": "/nonexistent"}, "MAIL_TEMPLATES_DIR must be an existing directory"),
    ],
)
def test_production_refuses_to_start_without_real_mail_settings(environ, message):
    base = {"ENVIRONMENT": "production", "JWT_SECRET_KEY": SECRET}
    with pytest.raises(ConfigError) as error:
        build_flask_config(load_settings({**base, **environ}))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert ":pw@" not in str(error.value)


def test_link_urls_default_to_the_frontend():
    config = build_flask_config(
        load_settings(
            {
                "ENVIRONMENT": "production",
                "JWT_SECRET_KEY": SECRET,
                "MAIL_URL": "smtp+starttls://user:pw@smtp.example.com:587",
                "MAIL_FROM": "Example <no-reply@example.com>",
                "FRONTEND_URL": "https://app.example.com/",
            }
        )
    )
    assert config["PASSWORD_RESET_URL"] == "https://app.example.com/reset-password"
    assert config["EMAIL_VERIFY_URL"] == "https://app.example.com/verify-email"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_templates_can_be_overridden(database_url, tmp_path):
    (tmp_path / "verify_email.subject.txt").write_text("Welcome aboard, {{ username }}\n")
    app = create_app(base_settings(DATABASE_URL=database_url, MAIL_URL="console:", MAIL_TEMPLATES_DIR=str(tmp_path)))
    register(app.test_client(), "ann")
    with app.app_context():
        row = db.session.scalar(select(OutboxMessage))
        assert row.subject == "Welcome aboard, ann"
        assert "Please confirm" in row.body_text  # the shipped text part still applies
    with app.app_context():
        db.engine.dispose()
