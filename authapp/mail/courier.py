"""The courier: delivers the outbox until it is told to stop (`flask mail courier`).

Each round claims a batch of due messages (one short transaction), sends each outside
any transaction, and settles it (sent: its address and body erased; failed: a retry
with backoff, or given up past MAIL_GIVE_UP_HOURS or on a permanent refusal). Every
outcome is an audit event, which the app's metrics count. SIGTERM or SIGINT ends the
courier after the message in hand.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from .. import audit, clock, settings
from ..database import unit_of_work
from ..errors import AppError
from . import outbox, transport

log = logging.getLogger("authapp.mail")

BATCH = 20


class Courier:
    def __init__(self, poll_interval: float = 1.0) -> None:
        current = settings.current()
        self.transport = transport.from_url(current.mail_url, current.mail_timeout)
        self.sender = current.mail_from
        # A claim outlives the longest possible conversation with the server.
        self.lease = timedelta(seconds=current.mail_timeout * 8 + 60)
        self.poll_interval = poll_interval
        self.stopping = threading.Event()

    def stop(self, *_args: object) -> None:
        self.stopping.set()

    def run(self) -> None:
        """Deliver until `stop()`; database outages are waited out."""
        log.info(
            "mail courier started", extra={"event": "mail_courier_started", "transport": self.transport.describe()}
        )
        while not self.stopping.is_set():
            try:
                handled = self.deliver_due()
            except AppError as error:  # database unavailable, breaker open
                log.warning("mail courier: %s", error.detail, extra={"event": "mail_courier_waiting"})
                handled = 0
            if handled < BATCH:
                self.stopping.wait(self.poll_interval)
        log.info("mail courier stopped", extra={"event": "mail_courier_stopped"})

    def deliver_due(self) -> int:
        """One round: claim the due messages and deliver each; returns how many it handled."""
        with unit_of_work() as db:
            claimed = outbox.claim(db, clock.now(), self.lease, BATCH)
        for message in claimed:
            self.deliver(message)
            if self.stopping.is_set():
                # The rest of the batch goes back to the queue when its lease ends.
                break
        return len(claimed)

    def deliver(self, message: outbox.Claimed) -> None:
        try:
            mime = transport.build(
                sender=self.sender,
                recipient=message.recipient,
                subject=message.subject,
                text=message.body_text,
                html=message.body_html,
                message_id=message.message_id,
                date=clock.now(),
            )
            self.transport.send(mime)
        except transport.DeliveryError as error:
            self._failed(message, str(error), permanent=error.permanent)
            return
        except ValueError as error:  # a message that cannot be written (never sent)
            self._failed(message, f"unsendable: {error}", permanent=True)
            return
        except Exception as error:  # a bug: logged, and the message retried like any failure
            log.exception("mail courier: sending failed", extra={"event": "mail_courier_error"})
            self._failed(message, f"{type(error).__name__}: {error}", permanent=False)
            return
        with unit_of_work() as db:
            outbox.mark_sent(db, message, clock.now())
        age = (clock.now() - message.created_at).total_seconds()
        audit.record(
            audit.MAIL_SENT,
            user_id=message.user_id,
            message_id=message.id,
            kind=message.kind,
            attempts=message.attempts,
            queued_seconds=round(age, 3),
        )

    def _failed(self, message: outbox.Claimed, error: str, *, permanent: bool) -> None:
        with unit_of_work() as db:
            status = outbox.mark_failed(db, message, clock.now(), error, permanent=permanent)
        event = audit.MAIL_GIVEN_UP if status == outbox.GIVEN_UP else audit.MAIL_RETRY
        audit.record(
            event,
            user_id=message.user_id,
            message_id=message.id,
            kind=message.kind,
            attempts=message.attempts,
            error=error,
        )
