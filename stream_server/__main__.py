"""``stream-server``: the command line.

Every field of :class:`~stream_server.config.Config` is a flag (``segmenter.max_segment_ms`` is
``--max-segment-ms``; interim settings carry an ``interim-`` prefix) and an environment variable
(``STREAM_SERVER_MAX_SEGMENT_MS``); a flag beats the environment, which beats the default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import typing
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import (
    AuthConfig,
    BatchConfig,
    CallsConfig,
    Config,
    EngineConfig,
    InterimConfig,
    LimitsConfig,
    SegmenterConfig,
    ServerConfig,
)
from .errors import ConfigError

ENV_PREFIX = "STREAM_SERVER_"
SECTIONS: tuple[tuple[str, type[Any], str], ...] = (
    ("server", ServerConfig, ""),
    ("engine", EngineConfig, ""),
    ("segmenter", SegmenterConfig, ""),
    ("interim", InterimConfig, "interim_"),
    ("batch", BatchConfig, ""),
    ("limits", LimitsConfig, ""),
    ("auth", AuthConfig, ""),
    ("calls", CallsConfig, ""),
)


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {raw!r}")


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


class _RepeatAction(argparse.Action):
    """A repeatable flag whose first use replaces the default (taken from the environment), so a flag
    still beats the environment; later uses add to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        if current is self.default:
            current = ()
        setattr(namespace, self.dest, (*current, values))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for secrets (an API key set in the environment would show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if getattr(action, "secret", False):
            return action.help
        return super()._get_help_string(action)


def _field_help(cls: type[Any], name: str) -> str:
    """The field's line from the dataclass docstring's Attributes section."""
    doc = cls.__doc__ or ""
    marker = f"{name}:"
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(marker):
            text = [line.strip()[len(marker) :].strip()]
            for more in lines[i + 1 :]:
                stripped = more.strip()
                if not stripped or (":" in stripped.split()[0]):
                    break
                text.append(stripped)
            return " ".join(text).replace("%", "%%")
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-server",
        description="Real-time speech transcription over WebSockets (Deepgram-compatible /v1/listen).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stream-server {__version__}")
    seen: set[str] = set()
    for section, cls, prefix in SECTIONS:
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dest = f"{section}.{f.name}"
            flag_name = f.metadata.get("flag", (prefix + f.name).replace("_", "-"))
            assert flag_name not in seen, f"duplicate flag --{flag_name}"
            seen.add(flag_name)
            env = ENV_PREFIX + (prefix + f.name).upper()
            hint = hints[f.name]
            kwargs: dict[str, Any] = {"dest": dest, "help": f"{_field_help(cls, f.name)} [env {env}]"}
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
            if hint is bool:
                kwargs["type"] = _parse_bool
                kwargs["metavar"] = "BOOL"
            elif hint == tuple[str, ...]:  # repeatable: --api-key A --api-key B, or A,B in the environment
                kwargs["action"] = _RepeatAction
                kwargs["metavar"] = "TEXT"
            elif choices:
                kwargs["choices"] = choices
            elif hint in (int, float, str):
                kwargs["type"] = hint
                kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}[hint]
            default = f.default
            if env in os.environ:
                raw = os.environ[env]
                try:
                    if hint == tuple[str, ...]:
                        default = _comma_list(raw)
                    else:
                        default = kwargs["type"](raw) if "type" in kwargs else raw
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    parser.error(f"{env}={raw!r}: {exc}")
            kwargs["default"] = default
            action = group.add_argument(f"--{flag_name}", **kwargs)
            action.secret = bool(f.metadata.get("secret") or f.metadata.get("repeat"))  # type: ignore[attr-defined]
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the validated Config from parsed flags.

    Raises:
        ConfigError: naming the field that is wrong.
    """
    parts: dict[str, Any] = {}
    values = vars(args)
    for section, cls, _ in SECTIONS:
        kwargs = {f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls)}
        parts[section] = cls(**kwargs)
    return Config(**parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Quiet chatty libraries at info level; our own logger keeps the configured level.
    for noisy in ("aiohttp.access", "modelscope", "urllib3", "filelock", "numba", "jieba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from .auth import is_loopback_host
    from .engines.loader import load_engine
    from .memory import pin_malloc_thresholds
    from .transport import Server

    pin_malloc_thresholds(config.server.malloc_mmap_threshold_kb * 1024)  # before anything big is allocated
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        os.kill(os.getpid(), signal.SIGTERM)

    max_audio_s = max(config.segmenter.max_segment_ms, config.interim.window_ms) / 1000

    def loader() -> Any:
        return load_engine(config.engine, max_audio_s=max_audio_s, max_batch_size=config.batch.max_batch_size)

    try:
        server = Server(config, engine_loader=loader, on_fatal=on_fatal)  # reads --api-keys-file
    except ConfigError as exc:
        parser.error(str(exc))
    log = logging.getLogger("stream_server")
    log.info("authentication: %s", server.auth.describe())
    if not server.auth.enabled and not is_loopback_host(config.server.host):
        log.warning(
            "NO API KEYS and listening on %s: anyone who can reach this port may stream audio; set "
            '--api-key or --api-keys-file (README, "Authentication")',
            config.server.host,
        )
    logging.getLogger("stream_server").info(
        "stream-server %s listening on http://%s:%d (WebSocket /v1/listen); loading model %r",
        __version__,
        config.server.host,
        config.server.port,
        config.engine.model,
    )
    asyncio.run(serve_until_signalled(server, config))
    if failed:
        logging.getLogger("stream_server").error("exiting: the model could not be loaded: %s", failed[0])
        return 1
    return 0


async def serve_until_signalled(server: Any, config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then drain (README, "Deploying: draining"): stop admitting at
    once (503, /readyz 503) with the socket still open, let open streams end by themselves for up to
    --drain-timeout-s, finalize the rest and close them with 1012, and return when the last is gone.
    A second signal cuts the wait short (the finalizing still happens)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logging.getLogger("stream_server").info("signal received: draining")
            stop.set()
        elif drain is not None and not drain.done():
            logging.getLogger("stream_server").warning("second signal: finalizing every stream now")
            drain.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    drain: asyncio.Task[None] | None = None
    await server.start()
    try:
        await stop.wait()
        drain = loop.create_task(server.drain(config.server.drain_timeout_s))
        try:
            await drain
        except asyncio.CancelledError:
            await server.drain(0.0)
    finally:
        await server.stop()


if __name__ == "__main__":
    sys.exit(main())
