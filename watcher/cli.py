"""`watcher` command line: parses arguments and hands over to the service; no logic here."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__, interpreter
from .logs import configure_logging  # first: it imports structlog without rich (see there)

if TYPE_CHECKING:
    from .childproc import WarmChildren
    from .config import Settings

DEFAULT_CONFIG = "/etc/watcher/watcher.toml"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 2, as argparse does, with our wording
        self.print_usage(sys.stderr)
        print(f"watcher: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return value


def _block_time(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds, e.g. 2 or 0.5") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be from 0 to 3600 seconds")
    return seconds


def _bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number from {low} to {high}")
        return int(value)

    return parse


_count = _bounded_int(1, 100_000, "--count")
_account = _bounded_int(0, 2**31 - 1, "--account")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="watcher", description="Watches EVM chains for invoice payments.")
    parser.add_argument("--version", action="version", version=f"watcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help=f"TOML config (default: $WATCHER_CONFIG, then {DEFAULT_CONFIG})")
    run.add_argument(
        "--sandbox", action="store_true", help="run on an embedded test chain; needs no config and no node"
    )
    run.add_argument("--listen", type=_listen, help="sandbox: HOST:PORT for the API (default 127.0.0.1:8080)")
    run.add_argument(
        "--checkout-listen",
        type=_listen,
        help="sandbox: HOST:PORT for the payment pages (default: the API's port + 1, or any free one)",
    )
    run.add_argument(
        "--block-time",
        type=_block_time,
        default=2.0,
        help="sandbox: seconds between blocks (default 2; 0: only on /v1/sandbox/mine)",
    )
    run.add_argument(
        "--webhook-url", action="append", default=[], help="sandbox: send webhooks here (repeatable)"
    )
    run.add_argument("--database", help="sandbox: SQLite file (default: a new temporary file)")

    check = commands.add_parser("check-config", help="validate a config file and print what it would watch")
    check.add_argument("--config", help=f"TOML config (default: $WATCHER_CONFIG, then {DEFAULT_CONFIG})")
    check.add_argument(
        "--offline", action="store_true", help="do not ask the nodes (router_address is then not checked)"
    )

    rewind = commands.add_parser(
        "rewind",
        help="move a chain's checkpoint back to a block (after a reorg deeper than the watcher remembers)",
    )
    rewind.add_argument("--config", help=f"TOML config (default: $WATCHER_CONFIG, then {DEFAULT_CONFIG})")
    rewind.add_argument("--chain", required=True, help="the chain's name, as in [[chains]] name")
    rewind.add_argument(
        "--to-block", type=_block_number, required=True, help="a block both chains share, below the fork"
    )

    xpub = commands.add_parser(
        "xpub", help="print the account xpub (m/44'/60'/N') of a BIP-39 mnemonic read from stdin"
    )
    xpub.add_argument("--account", type=_account, default=0, help="the account N of m/44'/60'/N' (default 0)")
    xpub.add_argument(
        "--passphrase", action="store_true", help="also read a BIP-39 passphrase (the second line of stdin)"
    )

    addresses = commands.add_parser(
        "addresses", help="print the first deposit addresses of each chain's deposit_xpub"
    )
    addresses.add_argument("--config", help=f"TOML config (default: $WATCHER_CONFIG, then {DEFAULT_CONFIG})")
    addresses.add_argument(
        "--count", type=_count, default=10, help="how many per chain (default 10, at most 100000)"
    )
    addresses.add_argument("--chain", help="only this chain (its name)")

    balances = commands.add_parser(
        "balances", help="deposit addresses that still hold funds (asks the running watcher)"
    )
    balances.add_argument("--config", help=f"TOML config (default: $WATCHER_CONFIG, then {DEFAULT_CONFIG})")

    commands.add_parser(
        "router-deploy-tx", help="print the PaymentRouter's creation data, for any wallet to send"
    )
    return parser


def _block_number(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError("expected a block number, e.g. 19000000")
    return int(value)


def _config_path(given: str | None) -> str:
    return given or os.environ.get("WATCHER_CONFIG") or DEFAULT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # pydantic looks for its plugins when it builds its first validator, by reading the
    # metadata of every installed package (importlib.metadata: about 0.05 s before the API can
    # answer). The watcher uses none. Set before the config module builds its models.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    collecting = gc.isenabled()
    if args.command == "run":
        # The daemon's imports create about 110,000 objects that live as long as it does, and
        # about 2,000 of garbage: the collector's passes over them (one full) cost about 0.05 s
        # before the API can answer. Off until _run has frozen them (see there).
        gc.disable()
    try:
        return _command(args)
    finally:
        if collecting:
            gc.enable()


def _command(args: argparse.Namespace) -> int:
    runner, warm = None, None
    if args.command == "run" and not args.sandbox:
        runner, warm = _warm_start(_config_path(args.config))
    from .config import ConfigError, describe, load_settings

    try:
        if args.command == "check-config":
            from .tools import run_check_config

            return run_check_config(_config_path(args.config), describe, offline=args.offline)
        if args.command == "rewind":
            return _rewind(load_settings(_config_path(args.config)), args.chain, args.to_block)
        if args.command in ("xpub", "addresses", "balances", "router-deploy-tx"):
            return _run_tool(args)
        if args.sandbox:
            return _run_sandbox(args)
        path = _config_path(args.config)
        settings = load_settings(path)
        assert runner is not None
        return _run(settings, runner, warm=warm, config_path=path)
    except ConfigError as exc:
        for key, message in exc.problems:
            print(f"watcher: configuration error: {key}: {message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if runner is not None:
            if warm is not None:
                runner.run(warm.discard())
            runner.close()


def _warm_start(path: str) -> tuple[asyncio.Runner, WarmChildren | None]:
    """The loop `watcher run` runs on, and the followers' process already starting on it: its
    interpreter imports beside the daemon's, which validates its config and imports its own
    modules meanwhile (about 0.3 s each on a small machine), so that it has loaded its watch
    sets when the daemon is ready, rather than 0.25 s after (BENCHMARKS.md, issue 13). The
    webhook dispatcher's process is not started warm: a third interpreter importing at once
    would slow the daemon's own start on two cores, and it is started only once the chains
    have caught up (`Service._dispatch_after_catch_up`). No warm child when the config file
    cannot be read as TOML: its error is said as usual, and the daemon does not start."""
    from .childproc import WarmChildren

    runner = asyncio.Runner()
    hidden = _env_names(path)
    if hidden is None:
        return runner, None
    warm = WarmChildren()
    runner.run(warm.start(["watcher.followproc"], hidden))
    return runner, warm


def _env_names(path: str) -> set[str] | None:
    """Every environment variable the config file names (the values of its `*_env` keys, and
    the default API key's), read before the config is validated: the warm children lack them."""
    import tomllib

    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, ValueError):
        return None
    names = {"WATCHER_API_KEY"}
    todo: list[object] = [data]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(key, str) and key.endswith("_env") and isinstance(value, str):
                    names.add(value)
                else:
                    todo.append(value)
        elif isinstance(item, list):
            todo.extend(item)
    return names


def _rewind(settings: Settings, chain: str, to_block: int) -> int:
    from .chain import RpcError
    from .rewind import rewind

    try:
        done = asyncio.run(rewind(settings, chain, to_block))
    except (RpcError, sqlite3.Error, OSError) as exc:  # a node that does not answer, a locked database
        print(f"watcher: rewind failed, nothing changed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{done.network}: checkpoint moved from block {done.previous} back to {done.block} "
        f"({done.block_hash}); "
        f"{done.payments_reverted} payment(s) above it marked reverted and their invoices judged again. "
        "Start the daemon: it reads the blocks above again and detects every payment still on the chain."
    )
    return EXIT_OK


def _run_tool(args: argparse.Namespace) -> int:
    from . import tools

    try:
        if args.command == "xpub":
            return tools.run_xpub(args.account, args.passphrase)
        if args.command == "addresses":
            return tools.run_addresses(_config_path(args.config), args.count, args.chain)
        if args.command == "balances":
            return tools.run_balances(_config_path(args.config))
        return tools.run_router_deploy_tx()
    except tools.ToolError as exc:
        print(f"watcher {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as exc:
        print(f"watcher {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _run(settings: Settings, runner: asyncio.Runner, **service_args: object) -> int:
    """Run the daemon on `runner`'s loop until a signal stops it (the caller closes the loop)."""
    from .clienttls import import_aiohttp
    from .config import ConfigError

    import_aiohttp()  # without reading the CA bundle yet: the service does once the API serves
    from .service import Service

    interpreter.tune()  # the switch interval and the collector (watcher/interpreter.py)
    gc.enable()  # off during the imports (main), which are frozen now

    # log_format as set in the file, or None: JSON under systemd or into a pipe, console on a terminal.
    explicit = "log_format" in settings.model_fields_set
    configure_logging(settings.log_format if explicit else None, settings.log_level)
    import structlog

    log = structlog.get_logger("watcher")

    async def go() -> None:
        # Webhooks go out from a process of their own (watcher/dispatchproc.py): another core.
        service = Service(settings, dispatcher_process=True, follower_process=True, **service_args)  # type: ignore[arg-type]
        await service.run_until_signalled()

    try:
        runner.run(go())
    except ConfigError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            log.exception("watcher_crashed", error=str(exc))
            return EXIT_FAILURE
        # The API's address is taken or not ours: say so in one line (systemd retries later).
        log.error("listen_failed", listen=getattr(exc, "listen", settings.http.listen), error=exc.strerror)
        return EXIT_FAILURE
    except Exception as exc:  # the one place that turns a crash into exit 1 with a log line
        log.exception("watcher_crashed", error=str(exc))
        return EXIT_FAILURE
    return EXIT_OK


def _next_port(listen: str) -> str:
    """The sandbox's payment pages: beside the API, on the next port, or on any free one when
    that is taken (the URL is printed either way)."""
    import socket

    host, _, port = listen.rpartition(":")
    wanted = int(port) + 1 if int(port) < 65535 else int(port) - 1
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    for candidate in (wanted, 0):
        with socket.socket(family) as probe:
            try:
                probe.bind((host.strip("[]"), candidate))
            except OSError:
                continue
            return f"{host}:{probe.getsockname()[1]}"
    return f"{host}:{wanted}"  # cannot bind here at all: the daemon will say so


def _run_sandbox(args: argparse.Namespace) -> int:
    from .config import settings_from_dict
    from .sandbox import (
        SandboxChain,
        claim_database,
        new_api_key,
        new_webhook_secret,
        sandbox_rates_data,
        sandbox_settings_data,
    )

    listen = args.listen or "127.0.0.1:8080"
    checkout_listen = args.checkout_listen or _next_port(listen)
    api_key = os.environ.get("WATCHER_API_KEY") or new_api_key()
    secret = os.environ.get("WATCHER_WEBHOOK_SECRET") or new_webhook_secret()  # pinned, like the API key
    database = args.database or str(Path(tempfile.mkdtemp(prefix="watcher-sandbox-")) / "watcher.db")
    chain = SandboxChain()
    database_note = claim_database(database, chain)
    env = {"WATCHER_API_KEY": api_key, "WATCHER_WEBHOOK_SECRET": secret}
    settings = settings_from_dict(
        {
            "database": database,
            "log_level": "info",
            "http": {"listen": listen, "api_key_env": "WATCHER_API_KEY"},
            "checkout": {
                "listen": checkout_listen,
                "public_base_url": f"http://{checkout_listen}",
                "brand_name": "Sandbox Shop",
            },
            "webhooks": [{"url": url, "secret_env": "WATCHER_WEBHOOK_SECRET"} for url in args.webhook_url],
            "chains": [sandbox_settings_data(chain, poll_interval=min(max(args.block_time / 4, 0.1), 2.0))],
            "rates": sandbox_rates_data(chain),
        },
        env=env,
    )
    print(
        "watcher sandbox\n"
        f"  API base URL:   http://{listen}/v1\n"
        f"  payment pages:  http://{checkout_listen}/pay/<invoice id> (each invoice's checkout_url)\n"
        f"  API key:        {api_key}\n"
        f"  webhook secret: {secret}\n"
        f"  webhook URLs:   {', '.join(args.webhook_url) or '(none; add --webhook-url URL)'}\n"
        f"  database:       {database} ({database_note})\n"
        f"  chain:          eth-tester, chain id {chain.chain_id}, a block every {args.block_time:g} s\n"
        f"  token:          TUSD at {chain.deployed.token}\n"
        f"  ETH/USD feed:   {chain.deployed.eth_usd_feed} (TestPriceFeed, 2000 USD: ETH is quoted live)\n"
        "Try:\n"
        f"  curl -s -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' "
        f'-d \'{{"amount": "49.99"}}\' http://{listen}/v1/invoices\n'
        f"  curl -s -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' "
        f"-d '{{}}' http://{listen}/v1/sandbox/invoices/<id>/pay"
        '   # or {"payment_option_id": "opt_...", "amount": "10"}\n'
        f"  curl -s -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' "
        f"-d '{{\"blocks\": 3}}' http://{listen}/v1/sandbox/mine\n"
        f"  curl -s -H 'Authorization: Bearer {api_key}' http://{listen}/v1/invoices/<id>/status\n",
        flush=True,
    )
    with asyncio.Runner() as runner:
        return _run(settings, runner, sandbox=chain, block_time=args.block_time)


if __name__ == "__main__":
    sys.exit(main())
