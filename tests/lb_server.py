"""A stream-server process with the fake engine, for tests that put a real load balancer in front.

    python -m tests.lb_server --port 8001 --drain-timeout-s 5 --max-sessions 1 --trusted-proxies 127.0.0.1/32

Takes every ``stream-server`` flag (the CLI's own parser and validation) plus ``--engine-delay-s``,
and serves with the CLI's ``serve_until_signalled``: SIGTERM drains exactly as the real server does.
Only the engine differs: :class:`tests.fakes.FakeEngine` (``"clip <seconds>"`` per segment, no model).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from stream_server.__main__ import build_parser, config_from_args, serve_until_signalled
from stream_server.errors import ConfigError
from stream_server.transport import Server

from .fakes import FakeEngine


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, build the server on a fake engine and serve until signalled.

    Args:
        argv: the command line without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 after a drain.
    """
    parser = build_parser()
    parser.prog = "python -m tests.lb_server"
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--engine-delay-s", type=float, default=0.01, help="the fake engine's time per batch")
    own, rest = extra.parse_known_args(argv)
    args = parser.parse_args(rest)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format=f"%(asctime)s port {config.server.port} %(levelname)-7s %(name)s: %(message)s",
    )
    server = Server(config, engine=FakeEngine(delay_s=own.engine_delay_s))
    asyncio.run(serve_until_signalled(server, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
