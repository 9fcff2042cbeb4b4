"""The transports of MAIL_URL against real servers (aiosmtpd): plain SMTP, STARTTLS
(required), implicit TLS, a login; `flask mail send-test` naming the step that failed;
the console transport; no header injection from any value."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from email import message_from_bytes, policy
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import base_settings
from hypothesis import given, settings
from hypothesis import strategies as st

from authapp import clock, create_app
from authapp.mail import courier, messages, transport
from devtools.mailbox import Mailbox, free_port


@pytest.fixture
def backend():
    return "sqlite"  # no database work here beyond the app's own


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, and a server context that presents it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return cert_file, context


@pytest.fixture
def trusted(certificate, monkeypatch):
    """Make the client trust the test certificate, as an operator's CA bundle would."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    return certificate[1]


def send_test(database_url, mail_url, address="someone@example.com", **extra):
    app = create_app(base_settings(DATABASE_URL=database_url, MAIL_URL=mail_url, MAIL_TIMEOUT="2", **extra))
    return app.test_cli_runner().invoke(args=["mail", "send-test", address])


def test_plain_smtp(database_url):
    with Mailbox() as box:
        result = send_test(database_url, box.url)
    assert result.exit_code == 0, result.output
    assert "sent: <" in result.output
    (message,) = box.messages()
    assert message.rcpt_tos == ["someone@example.com"] and message.message["Auto-Submitted"] == "auto-generated"
    assert message.text and message.html


def test_starttls_with_a_login(database_url, trusted):
    password = "p@ss:word/1"
    with Mailbox(tls_context=trusted, require_starttls=True, credentials=("mailer", password)) as box:
        url = f"smtp+starttls://mailer:{quote(password, safe='')}@127.0.0.1:{box.port}"
        result = send_test(database_url, url)
        wrong = send_test(database_url, f"smtp+starttls://mailer:nope@127.0.0.1:{box.port}")
    assert result.exit_code == 0, result.output
    assert len(box.messages()) == 1
    assert password not in result.output and quote(password, safe="") not in result.output
    assert wrong.exit_code == 1 and "failed at login: 535" in wrong.output, wrong.output


def test_implicit_tls(database_url, trusted):
    with Mailbox(tls_context=trusted, implicit_tls=True) as box:
        result = send_test(database_url, box.url)
    assert result.exit_code == 0, result.output
    assert len(box.messages()) == 1


def test_starttls_is_required_never_skipped(database_url):
    with Mailbox() as box:  # offers no STARTTLS
        result = send_test(database_url, f"smtp+starttls://127.0.0.1:{box.port}")
    assert result.exit_code == 1
    assert "failed at starttls" in result.output, result.output
    assert box.messages() == []


def test_an_untrusted_certificate_is_a_failure(database_url, certificate):
    with Mailbox(tls_context=certificate[1]) as box:
        starttls = send_test(database_url, box.url)
    with Mailbox(tls_context=certificate[1], implicit_tls=True) as box:
        implicit = send_test(database_url, box.url)
    assert starttls.exit_code == 1 and "failed at starttls: TLS certificate not trusted" in starttls.output
    assert implicit.exit_code == 1 and "failed at connect" in implicit.output and "certificate" in implicit.output


def test_nothing_listening(database_url):
    port = free_port()
    result = send_test(database_url, f"smtp://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert f"failed at connect: cannot reach 127.0.0.1:{port}" in result.output, result.output


def test_a_silent_server_times_out(database_url):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        result = send_test(database_url, f"smtp://127.0.0.1:{listener.getsockname()[1]}")
        elapsed = time.monotonic() - started
    finally:
        listener.close()
        for conn, _ in accepted:
            conn.close()
    assert result.exit_code == 1 and "timed out" in result.output, result.output
    assert elapsed < 15


def test_a_refusing_server_is_named(database_url):
    with Mailbox(refuse="554 5.7.1 rejected by policy") as box:
        result = send_test(database_url, box.url)
    assert result.exit_code == 1 and "failed at send: 554 5.7.1 rejected by policy" in result.output, result.output


def test_a_bad_address_is_refused_before_any_connection(database_url):
    result = send_test(database_url, "smtp://127.0.0.1:1", address="a@example.com\r\nBcc: x@evil.example")
    assert result.exit_code == 1 and "cannot write the message" in result.output


def test_console_prints_each_message_with_its_link(database_url, capsys):
    app = create_app(base_settings(DATABASE_URL=database_url, MAIL_URL="console:"))
    client = app.test_client()
    from helpers import PASSWORD

    client.post("/auth/register", json={"email": "eve@example.com", "username": "eve", "password": PASSWORD})
    capsys.readouterr()
    with app.app_context():
        assert courier.Courier(poll_interval=0).deliver_due() == 1
    out = capsys.readouterr().out
    assert "To: eve@example.com" in out and "Auto-Submitted: auto-generated" in out
    assert "http://127.0.0.1:8000/verify-email#token=" in out  # one line, ready to open


# -- Header injection ---------------------------------------------------------------------

HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "Content-Type", "MIME-Version"]


def built(recipient: str, subject: str) -> bytes:
    message = transport.build(
        sender="authapp <no-reply@example.com>",
        recipient=recipient,
        subject=subject,
        text="text",
        html="<p>html</p>",
        message_id="<1@example.com>",
        date=clock.now(),
    )
    return message.as_bytes()


@settings(max_examples=300, deadline=None)
@given(
    username=st.text(st.sampled_from("ab\r\n:\t Bcc:x@evil.example\x0b\x0c\x1c\x85\u2028"), max_size=40),
    local=st.text(st.sampled_from("ab\r\n:Bcc"), min_size=1, max_size=12),
)
def test_no_value_can_add_a_header(username, local):
    app = create_app(base_settings(DATABASE_URL="sqlite://"))
    with app.app_context():
        rendered = messages.render(
            messages.PASSWORD_CHANGED,
            service_name=username,
            username=username,
            email="a@example.com",
            when="now",
            reset_page="https://app.example.com/forgot-password",
        )
    assert "\r" not in rendered.subject and "\n" not in rendered.subject
    recipient = f"{local}@example.com"
    try:
        raw = built(recipient, rendered.subject)
    except ValueError:
        return  # refused: nothing is sent
    assert "\r" not in local and "\n" not in local  # a line break never gets through
    parsed = message_from_bytes(raw, policy=policy.default)
    assert sorted(parsed.keys()) == sorted(HEADERS), parsed.keys()
    assert parsed["To"].addresses[0].addr_spec == recipient


def test_a_line_break_in_the_recipient_is_refused():
    for recipient in ("a@example.com\r\nBcc: x@evil.example", "a@example.com\nX: y", "a@example.com\rX: y"):
        with pytest.raises(ValueError):
            built(recipient, "subject")
    with pytest.raises(ValueError):
        built("a@example.com, b@example.com", "subject")
