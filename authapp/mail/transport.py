"""Delivering one message: the MIME message built from an outbox row, and the transports
MAIL_URL names.

- `smtp://host[:25]`: plain SMTP, for a relay on the same host or a trusted network;
- `smtp+starttls://host[:587]`: STARTTLS is required (a server that does not offer it, or
  whose certificate does not verify, is a failure, never a fallback to plain text);
- `smtps://host[:465]`: TLS from the first byte;
- `user:password@` in any of them: AUTH after the TLS handshake (URL-encode special
  characters);
- `console:`: print each message to standard output (development and testing only).

Every SMTP step (connect, greeting, EHLO, STARTTLS, AUTH, each command of the sending)
has the MAIL_TIMEOUT deadline: the socket's timeout applies to each read and write.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import sys
from dataclasses import dataclass
from datetime import datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Protocol
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


class DeliveryError(Exception):
    """Sending failed at `step` (connect, starttls, login, send); `permanent` when the
    server refused the message for good (a 5xx answer to the recipient or the data)."""

    def __init__(self, step: str, detail: str, *, permanent: bool = False) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail
        self.permanent = permanent


def _no_line_breaks(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name} must be one line")
    return value


def domain_of(sender: str) -> str:
    return parseaddr(sender)[1].rpartition("@")[2] or "localhost"


def new_message_id(sender: str) -> str:
    return make_msgid(domain=domain_of(sender))


def build(
    *, sender: str, recipient: str, subject: str, text: str, html: str, message_id: str, date: datetime
) -> EmailMessage:
    """A multipart/alternative message with the headers mail providers expect. No header
    value can carry a line break (ValueError): nothing a user typed can add a header."""
    message = EmailMessage()
    message["From"] = _no_line_breaks("MAIL_FROM", sender)
    # Address() refuses anything that is not one addr-spec: no second recipient, no CR/LF.
    try:
        message["To"] = Address(addr_spec=_no_line_breaks("recipient", recipient))
    except (HeaderParseError, IndexError) as error:
        raise ValueError(f"not one email address: {error}") from None
    message["Subject"] = _no_line_breaks("subject", subject)
    message["Date"] = format_datetime(date)
    message["Message-ID"] = _no_line_breaks("Message-ID", message_id)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


class Transport(Protocol):
    def send(self, message: EmailMessage) -> None: ...

    def describe(self) -> str: ...


class ConsoleTransport:
    """Prints each message (headers and plain-text part) to standard output, so that a
    developer sees the link at once."""

    def describe(self) -> str:
        return "console (standard output)"

    def send(self, message: EmailMessage) -> None:
        text_part = message.get_body(preferencelist=("plain",))
        body = text_part.get_content() if text_part is not None else ""
        headers = "\n".join(f"{name}: {value}" for name, value in message.items())
        sys.stdout.write(f"----- mail -----\n{headers}\n\n{body}\n----- end of mail -----\n")
        sys.stdout.flush()


@dataclass(frozen=True)
class SmtpTransport:
    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None
    timeout: float

    @classmethod
    def from_url(cls, url: str, timeout: float) -> SmtpTransport:
        parts = urlsplit(url)
        return cls(
            scheme=parts.scheme,
            host=parts.hostname or "",
            port=parts.port or DEFAULT_PORTS[parts.scheme],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            timeout=timeout,
        )

    def describe(self) -> str:  # never the password
        login = f" as {self.username}" if self.username else ""
        return f"{self.scheme}://{self.host}:{self.port}{login}"

    def _connect(self) -> smtplib.SMTP:
        try:
            if self.scheme == "smtps":
                return smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
                )
            return smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        except (OSError, smtplib.SMTPException) as error:
            raise DeliveryError("connect", f"cannot reach {self.host}:{self.port}: {_describe(error)}") from None

    def send(self, message: EmailMessage) -> None:
        server = self._connect()
        try:
            self._session(server, message)
        finally:
            try:
                server.quit()
            except (OSError, smtplib.SMTPException):
                server.close()

    def _session(self, server: smtplib.SMTP, message: EmailMessage) -> None:
        step = "ehlo"
        try:
            server.ehlo()
            if self.scheme == "smtp+starttls":
                step = "starttls"
                # starttls() raises SMTPNotSupportedError when the server does not offer it.
                server.starttls(context=ssl.create_default_context())
                server.ehlo()
            if self.username:
                step = "login"
                server.login(self.username, self.password or "")
            step = "send"
            server.send_message(message)
        except smtplib.SMTPRecipientsRefused as error:
            codes = [code for code, _ in error.recipients.values()]
            raise DeliveryError(step, f"recipient refused: {_describe(error)}", permanent=min(codes) >= 500) from None
        except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as error:
            raise DeliveryError(step, _describe(error), permanent=500 <= error.smtp_code < 600) from None
        except (OSError, smtplib.SMTPException) as error:
            raise DeliveryError(step, _describe(error)) from None


def _describe(error: BaseException) -> str:
    """A one-line account of a failure (no credentials: smtplib's errors carry none)."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{code} {_text(reply)}" for code, reply in error.recipients.values())
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{error.smtp_code} {_text(error.smtp_error)}"
    if isinstance(error, smtplib.SMTPNotSupportedError):
        return f"not offered by the server ({error})"
    if isinstance(error, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {error.verify_message}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _text(reply: bytes | str) -> str:
    value = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(value.split())


def from_url(url: str, timeout: float) -> Transport:
    """The transport MAIL_URL names (config.py has checked it)."""
    if url == "console:":
        return ConsoleTransport()
    return SmtpTransport.from_url(url, timeout)
