"""The stream-server command line: one flag and one environment variable per config field."""

from __future__ import annotations

import dataclasses

import pytest

from stream_server.__main__ import SECTIONS, build_parser, config_from_args
from stream_server.config import Config
from stream_server.errors import ConfigError


def test_every_config_field_has_a_flag() -> None:
    """Each field of every config section is reachable as a --flag (interim ones with a prefix)."""
    help_text = build_parser().format_help()
    for _, cls, prefix in SECTIONS:
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", (prefix + f.name).replace("_", "-"))
            assert f"--{flag} " in help_text


def test_defaults_match_config_defaults() -> None:
    """With no flags and no environment, the CLI builds exactly the default Config."""
    assert config_from_args(build_parser().parse_args([])) == Config()


def test_environment_sets_defaults_and_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAM_SERVER_* variables set values; a flag on the command line beats them."""
    monkeypatch.setenv("STREAM_SERVER_MAX_SEGMENT_MS", "15000")
    monkeypatch.setenv("STREAM_SERVER_WARMUP", "false")
    monkeypatch.setenv("STREAM_SERVER_INTERIM_WINDOW_MS", "4000")
    config = config_from_args(build_parser().parse_args(["--max-segment-ms", "12000"]))
    assert config.segmenter.max_segment_ms == 12000
    assert config.engine.warmup is False
    assert config.interim.window_ms == 4000


def test_bad_environment_value_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed environment value stops the CLI with the variable's name."""
    monkeypatch.setenv("STREAM_SERVER_PORT", "eighty")
    with pytest.raises(SystemExit):
        build_parser()
    assert "STREAM_SERVER_PORT" in capsys.readouterr().err


def test_invalid_value_names_the_field() -> None:
    """A value out of range is refused by the config with the field's name."""
    with pytest.raises(ConfigError, match="cut_search_ms"):
        config_from_args(build_parser().parse_args(["--cut-search-ms", "15000"]))
