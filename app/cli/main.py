"""The `capsule` console script: serve, agent, migrate, keys, hosts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from app import logs, malloc
from app.config import ConfigError, Settings

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsule", description="Processes in capsules, behind GraphQL.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the API server (embedded default: SQLite, memory bus, agent)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    agent = commands.add_parser("agent", help="run a host agent alone")
    agent.add_argument("--listen", required=True, metavar="ADDR", help="HOST:PORT to listen on")
    agent.add_argument(
        "--metrics", metavar="ADDR", help="HOST:PORT to serve the agent's Prometheus metrics on (/metrics)"
    )
    commands.add_parser("migrate", help="apply the database migrations")
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create the team if needed and print a new key")
    create.add_argument("--team", required=True)
    listing = keys.add_parser("list", help="list a team's keys: id, prefix, created, revoked (never the key)")
    listing.add_argument("--team", required=True)
    revoke = keys.add_parser("revoke", help="revoke a key by its id: its open connections end too")
    revoke.add_argument("id", type=int, metavar="ID", help="the key's id, as `keys list` shows it")
    hosts = commands.add_parser("hosts", help="manage host agents").add_subparsers(
        dest="hosts_command", required=True
    )
    add = hosts.add_parser("add", help="register a host agent")
    add.add_argument("id")
    add.add_argument("address", metavar="ADDR", help="HOST:PORT of the agent")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"capsule: {exc}", file=sys.stderr)
        return 2
    logs.configure(kind=settings.log_format, level=args.log_level)
    malloc.tune()  # the agent's and the server's output path move buffers of a megabyte
    # Alembic narrates every plugin and step at INFO; a migration that happens is logged by app.store.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        if args.command == "agent":  # the agent alone: nothing of the API, the store or the bus loads
            from app.agent.server import run_agent

            asyncio.run(run_agent(args.listen, settings, metrics=args.metrics))
            return 0
        from app.cli import commands

        if args.command == "serve":
            return commands.serve(settings, host=args.host, port=args.port)
        if args.command == "migrate":
            return commands.migrate(settings)
        if args.command == "keys" and args.keys_command == "list":
            return asyncio.run(commands.list_keys(settings, args.team))
        if args.command == "keys" and args.keys_command == "revoke":
            return asyncio.run(commands.revoke_key(settings, args.id))
        if args.command == "keys":
            return asyncio.run(commands.create_key(settings, args.team))
        return asyncio.run(commands.add_host(settings, args.id, args.address))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a CLI user gets a line, not a traceback; the log has the rest
        logger.debug("command failed", exc_info=True)
        print(f"capsule: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
