"""`flask keys ...`: the signing keys of RS256, ES256 and EdDSA, and re-sealing what is
sealed under JWT_SECRET_KEY (docs/signing-keys.md).

Each command exits 0 on success and 1 with one clear line on error.
"""

from __future__ import annotations

import click
from flask.cli import AppGroup

from .auth import keys, mfa
from .clock import iso
from .errors import AppError

group = AppGroup(
    "keys",
    help="Generate, activate, retire and list the keys that sign tokens (RS256, ES256, EdDSA); "
    "re-seal stored secrets under JWT_SECRET_KEY.",
)


def _run(action, *args, **kwargs):
    try:
        return action(*args, **kwargs)
    except AppError as error:
        raise click.ClickException(error.detail) from None


def _warn_if_young(info: keys.KeyInfo) -> None:
    wait = keys.JWKS_MAX_AGE + keys.ring().interval
    age = keys.published_for(info).total_seconds()
    if age < wait:
        click.echo(
            f"warning: key {info.kid} has been published for {int(age)} s only; verifiers that cached the key "
            f"set may refuse its tokens for up to {int(wait - age)} s more",
            err=True,
        )


@group.command("generate")
@click.option("--activate", is_flag=True, help="Sign with it at once (a first key, or an emergency).")
def generate(activate: bool) -> None:
    """Make a key pair of JWT_ALGORITHM; published at once, signing only once activated."""
    info = _run(keys.generate, activate=activate)
    if activate:
        click.echo(f"generated and activated key {info.kid} ({info.algorithm})")
    else:
        click.echo(
            f"generated key {info.kid} ({info.algorithm}), standby: published, not signing; "
            f"activate it after verifiers' caches have learnt it (`keys activate {info.kid}`)"
        )


# A kid is a base64url thumbprint (RFC 7638), and one in 32 begins with "-": click would
# take it for an unknown option, so unknown options are passed on as arguments.
KID_ARGUMENT = {"ignore_unknown_options": True}


@group.command("activate", context_settings=KID_ARGUMENT)
@click.argument("kid")
def activate(kid: str) -> None:
    """Sign every new token with KID; the key that signed until now keeps verifying."""
    info = _run(keys.activate_key, kid)
    _warn_if_young(info)
    click.echo(f"activated key {info.kid} ({info.algorithm})")


@group.command("retire", context_settings=KID_ARGUMENT)
@click.argument("kid")
@click.option("--force", is_flag=True, help="Retire even though tokens it signed are still valid (a compromised key).")
def retire(kid: str, force: bool) -> None:
    """Stop publishing and accepting KID, and erase its private part."""
    info = _run(keys.retire_key, kid, force=force)
    click.echo(f"retired key {info.kid} ({info.algorithm})")


@group.command("list")
def list_keys() -> None:
    """List the keys: kid, algorithm, state, created, activated, retired."""
    for info in _run(keys.list_keys):
        activated = iso(info.activated_at) if info.activated_at else "-"
        retired = iso(info.retired_at) if info.retired_at else "-"
        click.echo(f"{info.kid}\t{info.algorithm}\t{info.state}\t{iso(info.created_at)}\t{activated}\t{retired}")


@group.command("reseal")
def reseal() -> None:
    """Seal every stored private key and TOTP secret again under JWT_SECRET_KEY; run it
    before removing a secret from JWT_PREVIOUS_SECRET_KEYS."""
    config = keys.ring().config
    results = [
        ("signing key(s)", _run(keys.reseal_signing_keys, config)),
        ("TOTP secret(s)", _run(mfa.reseal_secrets, config)),
    ]
    for what, result in results:
        click.echo(f"{what}: {result.resealed} re-sealed, {result.current} already under JWT_SECRET_KEY")
    unopenable = [name for _, result in results for name in result.unopenable]
    if unopenable:
        raise click.ClickException(
            f"{len(unopenable)} value(s) open with no configured secret (keep or restore the secret they were "
            f"sealed with): {', '.join(unopenable)}"
        )
