"""`flask mail ...`: the courier, a test message, the outbox's state."""

from __future__ import annotations

import signal

import click
from flask.cli import AppGroup, with_appcontext

from .. import clock, settings
from ..database import unit_of_work
from . import courier as courier_module
from . import outbox, transport

mail = AppGroup("mail", help="Deliver the outbox, send a test message, show the outbox.")


@mail.command("courier")
@click.option(
    "--poll",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between looks at an empty outbox.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve this courier's Prometheus metrics on 127.0.0.1:PORT (the app's /metrics shows the backlog).",
)
@with_appcontext
def courier(poll: float, metrics_port: int | None) -> None:
    """Deliver queued messages until SIGTERM or SIGINT (several may run at once)."""
    from flask import current_app

    worker = courier_module.Courier(poll_interval=poll)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from ..observability import metrics

        start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.of(current_app).registry)
    click.echo(f"mail courier delivering through {worker.transport.describe()}; SIGTERM or Ctrl-C stops it", err=True)
    worker.run()


@mail.command("send-test")
@click.argument("address")
@with_appcontext
def send_test(address: str) -> None:
    """Send a test message to ADDRESS now, through MAIL_URL (not the outbox), and say what failed."""
    current = settings.current()
    sender = transport.from_url(current.mail_url, current.mail_timeout)
    click.echo(f"sending a test message from {current.mail_from} to {address} through {sender.describe()}")
    try:
        message = transport.build(
            sender=current.mail_from,
            recipient=address,
            subject="authapp test message",
            text="This is a test message from authapp (flask mail send-test): the mail settings work.\n",
            html="<p>This is a test message from authapp (<code>flask mail send-test</code>): "
            "the mail settings work.</p>\n",
            message_id=transport.new_message_id(current.mail_from),
            date=clock.now(),
        )
    except ValueError as error:
        raise click.ClickException(f"cannot write the message: {error}") from None
    try:
        sender.send(message)
    except transport.DeliveryError as error:
        raise click.ClickException(f"failed at {error.step}: {error.detail}") from None
    click.echo(f"sent: {message['Message-ID']}")


@mail.command("status")
@with_appcontext
def status() -> None:
    """How many messages wait in the outbox, and the age of the oldest."""
    with unit_of_work() as db:
        waiting, oldest = outbox.queue_stats(db, clock.now())
    click.echo(f"{waiting} message(s) waiting; oldest {oldest:.0f} s")
