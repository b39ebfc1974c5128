"""The ``catga`` command line (also ``python -m fastapi_catga``): its arguments, settings and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from fastapi_catga._version import __version__
from fastapi_catga.cli.commands import Context, dead_letters, health, nodes
from fastapi_catga.cli.exits import FAILED, INTERRUPTED, OK, UNREACHABLE, USAGE, Exit, exit_for
from fastapi_catga.cli.render import dumps
from fastapi_catga.cli.send import send
from fastapi_catga.cli.watch import watch
from fastapi_catga.core.envelope import MAX_TIMEOUT
from fastapi_catga.exceptions import CatgaError, ConfigurationError
from fastapi_catga.settings import load_settings

__all__ = ["build_parser", "main"]

EPILOG = """\
exit codes:
  0  ok
  1  the operation failed: an error reply, no such node, type or dead letter, no answer in time
  2  usage error
  3  the broker is unreachable or misconfigured (CATGA_TRANSPORT=memory too: no broker to ask)
  130  interrupted (Ctrl-C; watch ends with 0)

The broker and cluster come from the CATGA_* variables the app reads (CATGA_TRANSPORT,
CATGA_NATS_URL, CATGA_REDIS_URL, CATGA_CLUSTER, ...); the broker options override them.
Credentials and TLS files come from those variables only (CATGA_NATS_PASSWORD,
CATGA_NATS_CREDS_FILE, CATGA_REDIS_PASSWORD, CATGA_REDIS_TLS_CA, ...): no option takes a secret,
so none shows in the process list.
"""

#: The options every command takes, before or after its name (absent ones set nothing, so a
#: subcommand's parser never overwrites what the main parser read).
_BROKER_OPTIONS = ("transport", "nats_url", "redis_url", "cluster")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # as CATGA_REQUEST_TIMEOUT: a deadline a header can carry
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_TIMEOUT:.0e} seconds: {text!r}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's parser, keeping the text of a usage error for ``--json`` (its subcommands' too)."""

    usage_error = ""

    def error(self, message: str) -> NoReturn:
        _Parser.usage_error = message
        super().error(message)


def _matching(pattern: str, what: str) -> Callable[[str], str]:
    """An argparse type: the text, if it is a whole match of ``pattern``."""

    def check(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise argparse.ArgumentTypeError(f"{text!r} is no {what}")
        return text

    return check


# What a node id and a wire type name may be (CatgaSettings.node_id, Message.type_name): anything
# else would be no subject on the broker either.
_node_id = _matching(r"[A-Za-z0-9_-]{1,64}", "node id ([A-Za-z0-9_-], at most 64)")
_type_name = _matching(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", "type name ([A-Za-z0-9_-], dot-separated)")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    broker = common.add_argument_group("broker options (default: the CATGA_* environment)")
    broker.add_argument("--transport", choices=("nats", "redis", "memory"), help="CATGA_TRANSPORT")
    broker.add_argument("--nats-url", metavar="URL", help="CATGA_NATS_URL")
    broker.add_argument("--redis-url", metavar="URL", help="CATGA_REDIS_URL")
    broker.add_argument("--cluster", metavar="NAME", help="CATGA_CLUSTER")
    broker.add_argument(
        "--broker-timeout",
        type=_seconds,
        metavar="S",
        help="seconds the broker may take to connect or answer (5)",
    )
    output = common.add_argument_group("output options")
    output.add_argument("--json", action="store_true", help="print JSON (watch: one object per line)")
    output.add_argument("-v", "--verbose", action="store_true", help="log what the client does, to stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``catga`` parser: one subcommand per operation."""
    common = [_common()]
    parser = _Parser(
        prog="catga",
        description="Look at and operate a fastapi-catga cluster through its broker; no app needed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=common,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, text: str, *, leaf: bool = True) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = parent.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=common if leaf else [],
        )
        return command

    add(commands, "nodes", "the live members, read from the broker's membership store")
    watching = add(commands, "watch", "the members, then one line per join, leave or heartbeat as it happens")
    watching.add_argument(
        "--for", dest="duration", type=_seconds, metavar="SECONDS", help="stop after SECONDS"
    )
    sending = add(commands, "send", "send a command or query by its wire type name and print its result")
    sending.add_argument(
        "type", type=_type_name, metavar="TYPE", help="the message's type_name, e.g. PlaceOrder"
    )
    sending.add_argument("body", metavar="JSON", help="""the message's fields, e.g. '{"sku": "apple"}'""")
    sending.add_argument(
        "--node", type=_node_id, metavar="ID", help="run it on this node (default: one that handles TYPE)"
    )
    sending.add_argument(
        "--timeout", type=_seconds, metavar="S", help="seconds to wait (CATGA_REQUEST_TIMEOUT)"
    )
    add(commands, "health", "connect and ask the membership store: exit 0 healthy, 3 not")
    letters = add(commands, "dead-letters", "list, show, replay or discard dead letters", leaf=False)
    actions = letters.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = add(actions, "list", "the dead letters, oldest first")
    listing.add_argument("--limit", type=_count, default=100, metavar="N", help="at most N (100)")
    for action, text in (
        ("get", "one dead letter, with its message"),
        ("replay", "put the message back in its queue (same message id) and drop the dead letter"),
        ("discard", "drop the dead letter for good"),
    ):
        add(actions, action, text).add_argument("letter_id", metavar="ID", help="<group>:<message id>")
    return parser


async def _run(ctx: Context, args: argparse.Namespace) -> int:
    if args.command == "nodes":
        return await nodes(ctx)
    if args.command == "watch":
        return await watch(ctx, args.duration)
    if args.command == "send":
        return await send(ctx, args.type, args.body, args.node, args.timeout)
    if args.command == "health":
        return await health(ctx)
    return await dead_letters(ctx, args.action, getattr(args, "letter_id", None), getattr(args, "limit", 100))


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # The library's warnings are written for an app's operators (Redis persistence, reconnects);
    # the CLI says what went wrong itself, and keeps its own warnings (a record it cannot read).
    logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("fastapi_catga.cli").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``catga`` with ``argv`` (default: the process's arguments); returns the exit code."""
    parser = build_parser()
    _Parser.usage_error = ""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # --help and --version (0), usage errors (2: said on stderr already)
        code = exc.code if isinstance(exc.code, int) else USAGE
        if code == USAGE and "--json" in words:  # and on stdout, as every other failure is
            print(dumps({"ok": False, "exit": USAGE, "error": _Parser.usage_error}, indent=None), flush=True)
        return code
    _configure_logging(getattr(args, "verbose", False))
    overrides = {name: getattr(args, name) for name in _BROKER_OPTIONS if hasattr(args, name)}
    as_json = getattr(args, "json", False)
    try:
        settings = load_settings(**overrides)
    except ConfigurationError as exc:
        return _fail(Exit(UNREACHABLE, str(exc)), as_json)
    ctx = Context(settings, as_json, getattr(args, "broker_timeout", 5.0))
    try:
        return asyncio.run(_run(ctx, args))
    except Exit as exc:
        return _fail(exc, as_json)
    except CatgaError as exc:
        return _fail(exit_for(exc), as_json)
    except KeyboardInterrupt:
        return OK if args.command == "watch" else INTERRUPTED
    except BrokenPipeError:  # the reader went away (`catga watch | grep -m1 join`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit either
        return OK if args.command == "watch" else FAILED


def _fail(exc: Exit, as_json: bool) -> int:
    """Say why on stderr; with ``--json``, on stdout too, as JSON (a script reads one stream)."""
    if exc.message:
        print(f"catga: {exc.message}", file=sys.stderr, flush=True)
        if as_json:
            print(dumps({"ok": False, "exit": exc.code, "error": exc.message}, indent=None), flush=True)
    return exc.code
