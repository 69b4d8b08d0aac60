"""The ``p2pnode`` click app: the group, its global options, and what every command shares.

Every command turns p2pnode's own errors into one line on stderr and a
non-zero exit status; a traceback means a bug.

Nothing heavy is imported at the top of ``cli/``: libp2p, web3, eth-account,
llama.cpp, the ASGI server and trio are imported by the commands that use
them, so that ``--help``, ``--version``, ``id``, ``status`` and ``offers``
start in under 0.3 s (README, "Benchmarks": ``bench cli``;
tests/cli/test_cli_output.py keeps it so).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from p2pnode.cli import settings
from p2pnode.cli.settings import option
from p2pnode.errors import ConfigError, P2PNodeError

logger = logging.getLogger("p2pnode.cli")

T = TypeVar("T")

CONTROL_SOCKET = "control.sock"

# Exit statuses: 1 for a failure at run time, 2 for bad usage or configuration
# (click uses 2 for usage errors too).
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def fail(exc: P2PNodeError) -> NoReturn:
    """Report ``exc`` on one line and exit: 2 for configuration, 1 for the rest."""
    click.echo(f"p2pnode: error: {exc}", err=True)
    sys.exit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` under trio; p2pnode's errors end the command (:func:`fail`)."""
    import trio

    if "libp2p" in sys.modules:
        # Importing libp2p resets its logger (propagate off, see setup_logging); a
        # command that runs libp2p has imported it by now, so its records are ours again.
        logging.getLogger("libp2p").propagate = True
    try:
        return trio.run(fn)
    except P2PNodeError as exc:
        fail(exc)


class _Libp2pNoise(logging.Filter):
    """Drop py-libp2p records below CRITICAL unless debugging.

    py-libp2p logs routine events (auto-connect rounds, closed streams) at
    INFO and ordinary failures (a refused dial) at ERROR, and sets levels on
    its child loggers itself, so a level on the "libp2p" logger is not
    enough: the handler filters. Our own code reports the failures that
    matter.
    """

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug or not record.name.startswith("libp2p"):
            return True
        return record.levelno >= logging.CRITICAL


def setup_logging(level: str, form: str = "text") -> None:
    """One handler on stderr for every logger, ours and py-libp2p's, writing
    ``form`` lines ("text", or "json": one object a line, ``logs.py``).

    py-libp2p's import (``import libp2p``) clears its "libp2p" logger and turns
    its propagation off; importing it here would cost every command ~0.5 s, so
    :func:`_run` turns propagation back on once a command has imported it.
    """
    from p2pnode import logs
    from p2pnode.cli import progress

    progress.LOGS_ONLY = form == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.JsonFormatter() if form == "json" else logs.TextFormatter())
    handler.addFilter(_Libp2pNoise(debug=level == "debug"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    # click.version_option wants the version when the command is defined; reading
    # it (importlib.metadata, ~40 ms) only when asked keeps it off every other command.
    if not value or ctx.resilient_parsing:
        return
    from p2pnode import __version__

    click.echo(f"p2pnode, version {__version__}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="P2PNODE_HOME",
    show_envvar=True,
    default=settings.default_home,
    show_default="~/.p2pnode",
    help="Directory with the node's keys, wallet and config.toml.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    envvar="P2PNODE_LOG_LEVEL",
    show_envvar=True,
    default="warning",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="P2PNODE_LOG_FORMAT",
    show_envvar=True,
    default="text",
    show_default=True,
    help="json: one object a line (time, level, event, message, node, peer, session, request).",
)
@click.pass_context
def main(ctx: click.Context, home: Path, log_level: str, log_format: str) -> None:
    """p2pnode: private, paid LLM inference over a pure peer-to-peer network."""
    home = home.expanduser()
    setup_logging(log_level, log_format)
    ctx.obj = home
    config_path = home / settings.CONFIG_FILE
    try:
        # Before config.toml is read: a file another user can change is not ours to obey.
        settings.check_home(home)
        ctx.default_map = settings.default_map_for(main, settings.load_config(home), config_path)
    except ConfigError as exc:
        fail(exc)


def home() -> Path:
    """The node's home directory (``--home``)."""
    home = click.get_current_context().obj
    assert isinstance(home, Path)
    return home


password_file = option(
    "--wallet-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the wallet passphrase (else P2PNODE_WALLET_PASSWORD, else a prompt).",
)


def serving_options(func: Any) -> Any:
    """The flags that say which models a node serves (start, generate, bench engine)."""
    for decorator in reversed(
        [
            option(
                "--model",
                "model_path",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="GGUF file to serve with llama.cpp (default: bundled SmolLM2-135M-Instruct).",
            ),
            option(
                "--model-id", default=None, help="Id to announce for --model (default: file stem)."
            ),
            option(
                "--slots",
                type=click.IntRange(1, 64),
                default=1,
                show_default=True,
                help="Requests served at once (one llama.cpp instance each).",
            ),
            option(
                "--queue-limit",
                type=click.IntRange(0, 10000),
                default=8,
                show_default=True,
                help="Requests that may wait for a slot; more are refused at once.",
            ),
            option(
                "--threads",
                type=click.IntRange(1, 256),
                default=None,
                help="llama.cpp threads per slot (default: cores - 1).",
            ),
            option(
                "--recommend-temperature",
                type=click.FloatRange(0.0, 2.0),
                default=None,
                help="Temperature to recommend for --model when a request sets none "
                "(default: the GGUF's, else its authors'; SmolLM2: 0.2).",
            ),
            option(
                "--recommend-top-p",
                type=click.FloatRange(0.0, 1.0, min_open=True),
                default=None,
                help="top_p to recommend for --model when a request sets none (SmolLM2: 0.9).",
            ),
            option(
                "--embeddings/--no-embeddings",
                default=False,
                show_default=True,
                help="Also serve --model for POST /v1/embeddings, as <model id>-embedding "
                "(llama.cpp's embedding mode, mean pooling; one slot).",
            ),
            option(
                "--upstream-url",
                default=None,
                help="OpenAI-compatible server to serve from (e.g. http://127.0.0.1:8080/v1).",
            ),
            option(
                "--upstream-model",
                multiple=True,
                default=[],
                help="Model id the upstream serves (repeatable; needs --upstream-url).",
            ),
            option(
                "--upstream-embedding-model",
                multiple=True,
                default=[],
                help="Model id the upstream embeds with (repeatable; needs --upstream-url).",
            ),
            option(
                "--upstream-key-file",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="File with the upstream's API key (never sent to peers).",
            ),
        ]
    ):
        func = decorator(func)
    return func


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
