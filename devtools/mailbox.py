"""A real SMTP server for tests and the e2e stack: aiosmtpd on a loopback port, keeping
every message it accepts (parsed), and able to stop, come back on the same port, or
refuse messages for a while."""

from __future__ import annotations

import email
import email.policy
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

LINK_RE = re.compile(r"(https?://[^\s\"<>]+#token=([A-Za-z0-9_-]+))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes

    @property
    def to(self) -> str:
        return str(self.message["To"])

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def part(self, subtype: str) -> str:
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None and body.get_content_subtype() == subtype, f"no text/{subtype} part"
        return body.get_content()

    @property
    def text(self) -> str:
        return self.part("plain")

    @property
    def html(self) -> str:
        return self.part("html")

    def link(self) -> str:
        """The one link with a token in the plain-text part."""
        found = {m.group(1) for m in LINK_RE.finditer(self.text)}
        assert len(found) == 1, (found, self.text)
        return found.pop()

    def token(self) -> str:
        return self.link().split("#token=", 1)[1]


@dataclass
class Mailbox:
    """`url` is the MAIL_URL that reaches it. `refuse` (an SMTP reply such as "451 ...")
    makes it refuse every message while set."""

    port: int = field(default_factory=free_port)
    tls_context: ssl.SSLContext | None = None
    implicit_tls: bool = False
    require_starttls: bool = False
    credentials: tuple[str, str] | None = None
    received: list[Received] = field(default_factory=list)
    refuse: str | None = None
    _controller: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp+starttls" if self.tls_context else "smtp"
        login = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"{scheme}://{login}127.0.0.1:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse:
            return self.refuse
        raw = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        with self._lock:
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message, raw))  # type: ignore[arg-type]
        return "250 Message accepted for delivery"

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = (
            self.credentials is not None and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False)

    def start(self) -> Mailbox:
        kwargs: dict[str, Any] = {}
        if self.implicit_tls:
            kwargs["ssl_context"] = self.tls_context
        elif self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
            kwargs["require_starttls"] = self.require_starttls
        if self.credentials is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = self.tls_context is not None
            # Plain SMTP in tests: allow AUTH without TLS there.
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> Mailbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def messages(self, to: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if to is None or to in r.rcpt_tos]

    def wait_for(self, count: int, to: str | None = None, timeout: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.messages(to)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.messages(to))} of {count} messages arrived within {timeout}s")
            time.sleep(0.05)
        return self.messages(to)
