"""``p2pnode keys``: API keys for a team, each with its own limits and usage.

See docs/architecture.md#team-keys.
"""

from __future__ import annotations

import json

import click

from p2pnode.cli import app
from p2pnode.errors import P2PNodeError


@app.main.group()
def keys() -> None:
    """API keys for the shim beside the owner's: add, list, revoke."""


@keys.command("add")
@click.argument("name")
@click.option(
    "--spend-limit",
    default=None,
    help="Most this key may spend, in whole tokens (its answers' seconds at their prices).",
)
@click.option(
    "--rate-limit", type=int, default=None, help="Most requests this key may make a minute."
)
def keys_add(name: str, spend_limit: str | None, rate_limit: int | None) -> None:
    """Make a key NAME and print it (once: only its SHA-256 is kept)."""
    from p2pnode.chain.units import parse_tokens
    from p2pnode.inference import keys as keylib

    try:
        limit = parse_tokens(spend_limit) if spend_limit is not None else None
        text = keylib.add_key(app.home(), name, limit, rate_limit)
    except P2PNodeError as exc:
        app.fail(exc)
    click.echo(text)
    click.echo(
        f"key {name!r} added: give it to its user as their OpenAI API key; it is not shown "
        "again. A running node takes it at once.",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (spend in the smallest unit).")
def keys_list(as_json: bool) -> None:
    """The keys, their limits, and what each has used (requests, tokens, spend)."""
    from p2pnode.chain.units import format_tokens
    from p2pnode.inference import keys as keylib

    try:
        listed = keylib.listing(keylib.read_keys(app.home()), keylib.read_usage(app.home()))
    except P2PNodeError as exc:
        app.fail(exc)
    if as_json:
        click.echo(json.dumps(listed))
        return
    if not listed:
        click.echo("no team keys (p2pnode keys add NAME makes one)")
    for k in listed:
        limits = []
        if k["spend_limit"] is not None:
            limits.append(f"spend limit {format_tokens(k['spend_limit'])}")
        if k["rate_limit"] is not None:
            limits.append(f"{k['rate_limit']} requests/min")
        click.echo(
            f"{k['name']:<16} {'REVOKED' if k['revoked'] else 'active':<8}"
            f" {k['requests']} requests, {k['prompt_tokens']}+{k['completion_tokens']} tokens,"
            f" spent {format_tokens(k['spent_wei'])}"
            + (f"  ({', '.join(limits)})" if limits else "")
        )


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke the key NAME: a running node refuses it from its next request on."""
    from p2pnode.inference import keys as keylib

    try:
        keylib.revoke_key(app.home(), name)
    except P2PNodeError as exc:
        app.fail(exc)
    click.echo(f"key {name!r} revoked")
