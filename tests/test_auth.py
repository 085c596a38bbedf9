"""Authentication and access control (README, "Authentication"): key files, grant tokens, origins, and
what a real server on 127.0.0.1 answers a real websockets or aiohttp client; nothing internal leaks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stream_server.__main__ import build_parser, config_from_args, main
from stream_server.auth import (
    ANONYMOUS,
    ApiKey,
    Authenticator,
    KeyRing,
    OriginPolicy,
    Principal,
    TokenSigner,
    collect_keys,
    derive_secret,
    is_loopback_host,
    key_name_for,
    normalize_origin,
    parse_allowed_origins,
    parse_grant_body,
    parse_keys_file,
)
from stream_server.config import AuthConfig, Config
from stream_server.engines.base import Engine
from stream_server.errors import AuthError, BadRequest, ConfigError
from stream_server.transport import PRINCIPAL_KEY, Server

from .fakes import FakeEngine
from .serving import collect, running_server
from .synth import pcm16, silence, tone

KEY = "k3y-for-tests-0123456789abcdef"
OTHER_KEY = "another-key-0123456789abcdef"
SECRET = "a-token-secret-for-the-tests-0123456789"
SPEECH = pcm16(np.concatenate([silence(500), tone(1000), silence(1000)]))


# --------------------------------------------------------------------------------------------------
# Key entries and files (pure)


def test_keys_file_takes_comments_names_and_max_sessions() -> None:
    """A keys file has comments, blank lines, NAME:KEY, max_sessions=N; unnamed keys get key-<sha256>."""
    text = f"""
# captions for the conference rooms
rooms:{KEY} max_sessions=4   # trailing comment
{OTHER_KEY}

    ops:{"z" * 20}
"""
    keys = [key for key, _ in parse_keys_file(text, "api_keys_file keys.txt")]
    assert keys == [
        ApiKey("rooms", KEY, 4),
        ApiKey(key_name_for(OTHER_KEY), OTHER_KEY, None),
        ApiKey("ops", "z" * 20, None),
    ]
    assert keys[1].name == "key-" + hashlib.sha256(OTHER_KEY.encode()).hexdigest()[:8]
    assert KEY not in repr(keys[0]), "a key never shows in a repr"


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("short", "16 to 512 characters"),
        (f"{KEY}.with.dots", "16 to 512 characters"),
        (f"bad name:{KEY}", "16 to 512 characters"),  # a space ends the key: "bad" is too short
        (f"-dash:{KEY}", "the name before ':'"),
        (f"anonymous:{KEY}", "reserved"),
        (f"a:{KEY} max_sessions=0", "max_sessions must be a whole number"),
        (f"a:{KEY} max_sessions=lots", "max_sessions must be a whole number"),
        (f"a:{KEY} max_sessions=2 max_sessions=3", "given twice"),
        (f"a:{KEY} colour=blue", "after the key only max_sessions"),
    ],
)
def test_bad_key_lines_name_the_line_and_never_repeat_it(line: str, says: str) -> None:
    """A wrong line stops the server with the file and line number, and the message holds no key."""
    text = f"ok:{OTHER_KEY}\n# comment\n{line}\n"
    with pytest.raises(ConfigError) as info:
        parse_keys_file(text, "api_keys_file /etc/keys")
    message = str(info.value)
    assert message.startswith("api_keys_file /etc/keys line 3: ") and says in message
    assert KEY not in message and "blue" not in message


def test_duplicate_names_and_keys_are_refused(tmp_path: Path) -> None:
    """The same name or the same key twice, across flags and file, is refused naming both places."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"a:{OTHER_KEY}\n")
    keys_file.chmod(0o600)
    with pytest.raises(ConfigError, match=r"line 1: the key name 'a' is already used \(api_keys entry 1\)"):
        collect_keys([f"a:{KEY}"], str(keys_file))
    with pytest.raises(ConfigError, match=r"line 1: the same key is already configured \(api_keys entry 1\)"):
        collect_keys([f"b:{OTHER_KEY}"], str(keys_file))
    assert [k.name for k in collect_keys([f"b:{KEY}"], str(keys_file))] == ["b", "a"]


def test_keys_file_that_is_empty_missing_or_readable_by_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty or missing keys file stops the server (it would otherwise run open); a file others may
    read is used, with a warning."""
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        collect_keys([], str(empty))
    with pytest.raises(ConfigError, match="cannot be read"):
        collect_keys([], str(tmp_path / "missing"))
    shared = tmp_path / "shared"
    shared.write_text(f"{KEY}\n")
    shared.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="stream_server.auth"):
        assert len(collect_keys([], str(shared))) == 1
    assert "chmod 600" in caplog.text


def test_key_ring_matches_whole_keys_only() -> None:
    """A presented key matches exactly one configured key; a prefix, a longer string or another key
    matches none."""
    ring = KeyRing([ApiKey("a", KEY), ApiKey("b", OTHER_KEY, 2)])
    assert ring.match(KEY) == ApiKey("a", KEY)
    assert ring.match(OTHER_KEY) == ApiKey("b", OTHER_KEY, 2)
    for wrong in (KEY[:-1], KEY + "x", "", KEY.upper(), "\udcff"):
        assert ring.match(wrong) is None


# --------------------------------------------------------------------------------------------------
# Grant tokens (pure, with an injected clock)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sign(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
    return f"{signing_input}.{signature}"


def test_token_verifies_until_it_expires() -> None:
    """A token names its key until exactly its expiry, then is TOKEN_EXPIRED."""
    clock = Clock()
    signer = TokenSigner(b"s" * 32, clock)
    token = signer.issue("rooms", 30)
    assert token.count(".") == 2 and signer.issue("rooms", 30) != token, "every token is new (jti)"
    assert signer.verify(token) == "rooms"
    clock.now += 29.9
    assert signer.verify(token) == "rooms"
    clock.now += 0.1
    with pytest.raises(AuthError) as info:
        signer.verify(token)
    assert (info.value.status, info.value.code) == (401, "TOKEN_EXPIRED")
    assert "expired 0 s ago" in info.value.description


def test_forged_altered_or_foreign_tokens_are_invalid() -> None:
    """A token altered, signed with another secret, with alg none, or issued far in the future, or
    claiming a life beyond an hour, is INVALID_AUTH."""
    clock = Clock()
    secret = b"s" * 32
    signer = TokenSigner(secret, clock)
    token = signer.issue("rooms", 30)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    hs256 = {"alg": "HS256", "typ": "JWT"}
    altered = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "ops"}).encode()).decode().rstrip("=")
    forged = [
        f"{header}.{altered}.{signature}",
        TokenSigner(b"t" * 32, clock).issue("rooms", 30),
        _sign(secret, {"alg": "none", "typ": "JWT"}, claims),
        _sign(secret, hs256, {**claims, "iat": int(clock.now) + 3600, "exp": int(clock.now) + 3630}),
        _sign(secret, hs256, {**claims, "exp": claims["iat"] + 7200}),
        token[:-2],
        "not.a.token",
        "x" * 5000,
        "é.é.é",
    ]
    for bad in forged:
        with pytest.raises(AuthError) as info:
            signer.verify(bad)
        assert (info.value.status, info.value.code) == (401, "INVALID_AUTH"), bad
    # The same claims signed the way this server does are accepted: the checks above are not vacuous.
    assert signer.verify(_sign_like_server(secret, claims)) == "rooms"


def _sign_like_server(secret: bytes, claims: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def test_derived_secret_depends_on_every_key_not_their_order() -> None:
    """Without --auth-secret, replicas with the same keys (in any order) share a secret; another key
    set gives another."""
    a, b = ApiKey("a", KEY), ApiKey("b", OTHER_KEY)
    assert derive_secret([a, b]) == derive_secret([b, a])
    assert derive_secret([a]) != derive_secret([a, b])
    assert KEY.encode() not in derive_secret([a])


@pytest.mark.parametrize(
    ("body", "ttl", "code"),
    [
        (b"", 30, None),
        (b"  ", 30, None),
        (b"{}", 30, None),
        (b'{"ttl_seconds": 60}', 60, None),
        (b'{"ttl_seconds": 3600.0}', 3600, None),
        (b'{"ttl_seconds": 0}', None, "INVALID_PARAMETER"),
        (b'{"ttl_seconds": 3601}', None, "INVALID_PARAMETER"),
        (b'{"ttl_seconds": "10"}', None, "INVALID_PARAMETER"),
        (b'{"ttl_seconds": true}', None, "INVALID_PARAMETER"),
        (b'{"ttl_seconds": 1.5}', None, "INVALID_PARAMETER"),
        (b"[30]", None, "INVALID_JSON"),
        (b"ttl=30", None, "INVALID_JSON"),
        (b"\xff", None, "INVALID_JSON"),
        (b" " * 5000, None, "INVALID_PARAMETER"),
    ],
)
def test_grant_body(body: bytes, ttl: int | None, code: str | None) -> None:
    """A grant's body is empty or {"ttl_seconds": 1..3600}; anything else is a 400 with a code."""
    if code is None:
        assert parse_grant_body(body) == ttl
    else:
        with pytest.raises(BadRequest) as info:
            parse_grant_body(body)
        assert info.value.code == code


# --------------------------------------------------------------------------------------------------
# Origins and the whole check (pure)


def test_origins_are_normalized_and_bad_ones_named() -> None:
    """Origins compare in lower case without default ports; a path or a bare host is refused, naming
    allowed_origins."""
    assert normalize_origin("HTTPS://Captions.Example.org:443") == "https://captions.example.org"
    assert normalize_origin("http://[::1]:8000/") == "http://[::1]:8000"
    assert parse_allowed_origins(" https://a.example , *,") == ("https://a.example", "*")
    for bad in ("captions.example.org", "https://a.example/page", "ftp://a.example", "https://u:p@a.example"):
        with pytest.raises(ConfigError, match="allowed_origins: .* is not an origin"):
            parse_allowed_origins(bad)


@pytest.mark.parametrize(
    ("setting", "keys", "origin", "host", "allowed"),
    [
        ("", False, "https://anywhere.example", "s:8000", True),  # open server, as before
        ("", True, "https://anywhere.example", "s:8000", False),
        ("", True, None, "s:8000", True),  # not a browser
        ("", True, "http://s:8000", "s:8000", True),  # the server's own page
        ("", True, "https://s", "s", True),  # behind a TLS proxy on the default port
        ("", True, "http://s:8001", "s:8000", False),
        ("", True, "http://s", "s:8000", False),
        ("", True, "null", "s:8000", False),
        ("https://app.example", True, "https://APP.example:443", "s:8000", True),
        ("https://app.example", True, "https://app.example.evil", "s:8000", False),
        ("https://app.example", False, "https://other.example", "s:8000", False),  # a list binds open servers
        ("*", True, "null", "s:8000", True),
    ],
)
def test_origin_policy(setting: str, keys: bool, origin: str | None, host: str, allowed: bool) -> None:
    """No Origin and the server's own pass; others need the list, which is empty-means-any only on an
    open server."""
    assert OriginPolicy.from_setting(setting, keys).allows(origin, host) is allowed


def test_credentials_from_headers_and_subprotocols() -> None:
    """Token/Bearer in either place, schemes in any case; the subprotocol is selected as offered."""
    clock = Clock()
    auth = Authenticator([ApiKey("rooms", KEY, 3)], secret=SECRET.encode(), clock=clock)
    token = auth.issue(Principal("rooms", 3), 30)
    rooms_key, rooms_token = Principal("rooms", 3, "key"), Principal("rooms", 3, "token")
    assert auth.authenticate(f"Token {KEY}", None) == (rooms_key, None)
    assert auth.authenticate(f"token  {KEY} ", None) == (rooms_key, None)
    assert auth.authenticate(f"Bearer {token}", None) == (rooms_token, None)
    assert auth.authenticate(None, f"token, {KEY}") == (rooms_key, "token")
    assert auth.authenticate(None, f"Bearer,{token}") == (rooms_token, "Bearer")
    assert auth.authenticate(f"Token {KEY}", "chat, bearer, x") == (rooms_key, "bearer")
    cases = [
        (None, None, "AUTH_REQUIRED"),
        ("", "chat", "AUTH_REQUIRED"),
        (f"Basic {KEY}", None, "INVALID_AUTH"),
        ("Token", None, "INVALID_AUTH"),
        (f"Token {OTHER_KEY}", None, "INVALID_AUTH"),
        (None, "token", "INVALID_AUTH"),
        (None, f"bearer, {token}x", "INVALID_AUTH"),
    ]
    for authorization, protocols, code in cases:
        with pytest.raises(AuthError) as info:
            auth.authenticate(authorization, protocols)
        assert info.value.code == code, (authorization, protocols)
    with pytest.raises(AuthError, match="query string are not accepted"):
        auth.authenticate(None, None, query_credentials=True)
    clock.now += 31
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(None, f"bearer, {token}")
    # Only a key may ask for a grant.
    assert auth.authenticate_key(f"Token {KEY}") == rooms_key
    with pytest.raises(AuthError) as info:
        auth.authenticate_key(f"Bearer {auth.issue(rooms_key, 30)}")
    assert (info.value.status, info.value.code) == (403, "API_KEY_REQUIRED")


def test_open_server_selects_the_offered_subprotocol_and_checks_nothing() -> None:
    """Without keys everyone is anonymous, but a client's token/bearer subprotocol is still selected
    (a browser fails a handshake that offered one and got none)."""
    auth = Authenticator()
    assert not auth.enabled
    assert auth.authenticate("Token whatever", "bearer, x.y.z") == (ANONYMOUS, "bearer")
    assert auth.authenticate(None, None) == (ANONYMOUS, None)


def test_a_token_of_a_key_no_longer_configured_is_invalid() -> None:
    """Removing a key (and restarting) revokes the tokens it granted, even with a fixed secret."""
    before = Authenticator([ApiKey("gone", KEY), ApiKey("kept", OTHER_KEY)], secret=SECRET.encode())
    token = before.issue(Principal("gone"), 30)
    after = Authenticator([ApiKey("kept", OTHER_KEY)], secret=SECRET.encode())
    with pytest.raises(AuthError, match="no longer accepted"):
        after.authenticate(f"Bearer {token}", None)


def test_loopback_hosts() -> None:
    """Only loopback binds stay quiet about a server without keys."""
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "10.0.0.1", "captions.example.org", ""))


# --------------------------------------------------------------------------------------------------
# Configuration and the command line


def test_auth_config_validates_and_hides_secrets() -> None:
    """AuthConfig refuses bad entries naming the field, and its repr shows neither keys nor secret."""
    with pytest.raises(ConfigError, match="api_keys entry 2: a key must be"):
        AuthConfig(api_keys=(KEY, "short"))
    with pytest.raises(ConfigError, match="api_keys: must be a tuple"):
        AuthConfig(api_keys=KEY)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="auth_secret: must be at least 32 characters"):
        AuthConfig(auth_secret="short")
    with pytest.raises(ConfigError, match="allowed_origins"):
        AuthConfig(allowed_origins="example.org")
    text = repr(Config(auth=AuthConfig(api_keys=(KEY,), auth_secret=SECRET)))
    assert KEY not in text and SECRET not in text


def test_cli_keys_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--api-key repeats; STREAM_SERVER_API_KEYS takes them comma-separated; a flag beats the
    environment; --help never shows a key from the environment."""
    monkeypatch.setenv("STREAM_SERVER_API_KEYS", f"env:{KEY}, {OTHER_KEY}")
    monkeypatch.setenv("STREAM_SERVER_AUTH_SECRET", SECRET)
    monkeypatch.setenv("STREAM_SERVER_ALLOWED_ORIGINS", "https://app.example")
    config = config_from_args(build_parser().parse_args([]))
    assert config.auth.api_keys == (f"env:{KEY}", OTHER_KEY)
    assert config.auth.auth_secret == SECRET and config.auth.allowed_origins == "https://app.example"
    flags = ["--api-key", f"a:{OTHER_KEY}", "--api-key", f"b:{KEY} max_sessions=2", "--api-keys-file", "/k"]
    config = config_from_args(build_parser().parse_args(flags))
    assert config.auth.api_keys == (f"a:{OTHER_KEY}", f"b:{KEY} max_sessions=2")
    assert config.auth.api_keys_file == "/k"
    help_text = build_parser().format_help()
    assert "--api-key TEXT" in help_text and "STREAM_SERVER_API_KEYS" in help_text
    assert KEY not in help_text and OTHER_KEY not in help_text and SECRET not in help_text


def test_cli_stops_on_a_bad_keys_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stream-server with a wrong keys file exits before loading anything, naming the file's line."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY}\nnot-a-key\n")
    with pytest.raises(SystemExit) as info:
        main(["--api-keys-file", str(keys_file), "--port", "0", "--malloc-mmap-threshold-kb", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"api_keys_file {keys_file} line 2: a key must be" in err and KEY not in err


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (["--host", "0.0.0.0"], True),
        (["--host", "127.0.0.1"], False),
        (["--host", "0.0.0.0", "--api-key", KEY], False),
    ],
)
def test_cli_warns_when_an_open_server_listens_beyond_loopback(
    args: list[str], warned: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Listening on a non-loopback address without keys logs a WARNING at start; with keys it logs
    their names only."""
    import stream_server.__main__ as cli

    async def no_serving(*_: Any) -> None:  # start-up up to listening, no model
        return None

    monkeypatch.setattr(cli, "serve_until_signalled", no_serving)
    with caplog.at_level(logging.INFO, logger="stream_server"):
        assert main([*args, "--port", "0", "--malloc-mmap-threshold-kb", "0"]) == 0
    assert ("NO API KEYS" in caplog.text) is warned
    assert "authentication: " in caplog.text and KEY not in caplog.text


# --------------------------------------------------------------------------------------------------
# A real server


def auth_config(**fields: Any) -> Config:
    return Config(auth=AuthConfig(**{"api_keys": (f"rooms:{KEY} max_sessions=3",), **fields}))


def http(url: str) -> str:
    return url.replace("ws://", "http://")


async def refusal(url: str, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    """The HTTP status, body and headers of a refused handshake."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}"), response.headers


async def finish(ws: Any) -> int:
    """Stream a tone and CloseStream; the number of finals."""
    await ws.send(SPEECH)
    await ws.send(json.dumps({"type": "CloseStream"}))
    result = await collect(ws)
    assert result.close_code == 1000
    return len(result.finals())


async def grant(base: str, authorization: str | None, body: Any = None, **headers: str) -> tuple[int, Any]:
    if authorization is not None:
        headers["Authorization"] = authorization
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{http(base)}/v1/auth/grant", json=body, headers=headers) as response:
            return response.status, await response.json()


async def metric_samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{http(base)}/metrics") as response:
            text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.e2e
async def test_a_server_with_keys_refuses_streams_without_valid_ones() -> None:
    """No credentials: 401 AUTH_REQUIRED; a wrong key: 401 INVALID_AUTH; both with dg-error and
    WWW-Authenticate, counted by reason; a key in the query string is not taken."""
    async with running_server(FakeEngine(), auth_config()) as (_, url):
        status, body, headers = await refusal(f"{url}/v1/listen")
        assert (status, body["code"]) == (401, "AUTH_REQUIRED")
        assert headers["dg-error"] and headers["WWW-Authenticate"].startswith("Token realm=")
        status, body, _ = await refusal(f"{url}/v1/listen?token={KEY}")
        assert (status, body["code"]) == (401, "AUTH_REQUIRED") and "query string" in body["description"]
        status, body, headers = await refusal(
            f"{url}/v1/listen", additional_headers={"Authorization": f"Token {OTHER_KEY}"}
        )
        assert (status, body["code"]) == (401, "INVALID_AUTH") and "WWW-Authenticate" in headers
        status, body, _ = await refusal(f"{url}/v1/listen", subprotocols=["token", OTHER_KEY])  # type: ignore[list-item]
        assert (status, body["code"]) == (401, "INVALID_AUTH")
        samples = await metric_samples(url)
    assert samples[("stream_auth_failures_total", (("reason", "auth_required"),))] == 2
    assert samples[("stream_auth_failures_total", (("reason", "invalid_auth"),))] == 2
    assert samples[("stream_sessions_rejected_total", (("reason", "unauthorized"),))] == 4


@pytest.mark.e2e
async def test_an_api_key_in_the_header_or_the_token_subprotocol_opens_a_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Authorization: Token KEY streams; so does the subprotocol pair (token, KEY), the server selecting
    token; the log names the key, never shows it."""
    with caplog.at_level(logging.INFO):
        async with running_server(FakeEngine(), auth_config()) as (server, url):
            async with connect(
                f"{url}/v1/listen", additional_headers={"Authorization": f"Token {KEY}"}
            ) as ws:
                assert ws.subprotocol is None
                assert await finish(ws) == 1
            async with connect(f"{url}/v1/listen", subprotocols=["token", KEY]) as ws:  # type: ignore[list-item]
                assert ws.subprotocol == "token"
                assert await finish(ws) == 1
            samples = await metric_samples(url)
    assert samples[("stream_auth_accepted_total", (("key", "rooms"), ("method", "key")))] == 2
    assert "key rooms" in caplog.text or "key=rooms" in caplog.text
    assert KEY not in caplog.text


@pytest.mark.e2e
async def test_grant_tokens_open_streams_by_bearer_header_and_subprotocol() -> None:
    """POST /v1/auth/grant with the key gives Deepgram's {access_token, expires_in}; the token works as
    Authorization: Bearer and as the subprotocol pair (bearer, TOKEN), the server selecting bearer."""
    async with running_server(FakeEngine(), auth_config()) as (server, url):
        status, body = await grant(url, f"Token {KEY}")
        assert status == 200 and body["expires_in"] == 30 and set(body) == {"access_token", "expires_in"}
        token = body["access_token"]
        async with connect(f"{url}/v1/listen", additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            assert await finish(ws) == 1
        async with connect(f"{url}/v1/listen", subprotocols=["bearer", token]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            assert await finish(ws) == 1
        status, body = await grant(url, f"Token {KEY}", {"ttl_seconds": 600})
        assert status == 200 and body["expires_in"] == 600
        samples = await metric_samples(url)
    assert samples[("stream_auth_accepted_total", (("key", "rooms"), ("method", "token")))] == 2
    assert samples[("stream_auth_grants_total", (("key", "rooms"),))] == 2


@pytest.mark.e2e
async def test_the_principal_is_kept_on_the_request() -> None:
    """The transport keeps who a stream is as request[PRINCIPAL_KEY]: the key's name and max_sessions,
    also for a token from that key."""
    seen: list[Any] = []
    async with running_server(FakeEngine(), auth_config()) as (server, url):
        original = server._authenticate

        def spy(request: Any) -> Any:
            answer = original(request)
            seen.append(request.get(PRINCIPAL_KEY))
            return answer

        server._authenticate = spy  # type: ignore[method-assign]
        async with connect(f"{url}/v1/listen", subprotocols=["token", KEY]) as ws:  # type: ignore[list-item]
            await finish(ws)
        _, body = await grant(url, f"Token {KEY}")
        async with connect(f"{url}/v1/listen", subprotocols=["bearer", body["access_token"]]) as ws:
            await finish(ws)
    assert seen == [Principal("rooms", 3, "key"), Principal("rooms", 3, "token")]


@pytest.mark.e2e
async def test_grant_refusals() -> None:
    """A grant without a key is 401, with a token 403 API_KEY_REQUIRED, with a bad ttl 400; a server
    without keys answers 404 AUTH_NOT_CONFIGURED."""
    async with running_server(FakeEngine(), auth_config()) as (_, url):
        assert (await grant(url, None))[1]["code"] == "AUTH_REQUIRED"
        status, body = await grant(url, f"Token {OTHER_KEY}")
        assert (status, body["code"]) == (401, "INVALID_AUTH")
        _, issued = await grant(url, f"Token {KEY}")
        status, body = await grant(url, f"Bearer {issued['access_token']}")
        assert (status, body["code"]) == (403, "API_KEY_REQUIRED")
        status, body = await grant(url, f"Token {KEY}", {"ttl_seconds": 7200})
        assert (status, body["code"]) == (400, "INVALID_PARAMETER")
    async with running_server(FakeEngine()) as (_, url):
        status, body = await grant(url, f"Token {KEY}")
        assert (status, body["code"]) == (404, "AUTH_NOT_CONFIGURED")


@pytest.mark.e2e
async def test_an_expired_token_is_refused() -> None:
    """A token past its expiry gets 401 TOKEN_EXPIRED at the handshake."""
    config = auth_config(auth_secret=SECRET)
    stale = TokenSigner(SECRET.encode(), clock=lambda: time.time() - 120).issue("rooms", 30)
    fresh = TokenSigner(SECRET.encode()).issue("rooms", 30)
    async with running_server(FakeEngine(), config) as (_, url):
        status, body, _ = await refusal(f"{url}/v1/listen", subprotocols=["bearer", stale])  # type: ignore[list-item]
        assert (status, body["code"]) == (401, "TOKEN_EXPIRED")
        async with connect(f"{url}/v1/listen", subprotocols=["bearer", fresh]) as ws:  # type: ignore[list-item]
            assert await finish(ws) == 1, "the same secret, not expired: accepted"


@pytest.mark.e2e
async def test_origins_not_allowed_get_403() -> None:
    """With keys, a page from another origin gets 403 ORIGIN_NOT_ALLOWED even with a valid key; the
    server's own page and listed origins connect."""
    config = auth_config(allowed_origins="https://app.example")
    async with running_server(FakeEngine(), config) as (_, url):
        port = url.rsplit(":", 1)[1]
        creds: Any = {"subprotocols": ["token", KEY]}
        status, body, _ = await refusal(f"{url}/v1/listen", origin="https://evil.example", **creds)
        assert (status, body["code"]) == (403, "ORIGIN_NOT_ALLOWED")
        for origin in ("https://app.example", f"http://127.0.0.1:{port}"):
            async with connect(f"{url}/v1/listen", origin=origin, **creds) as ws:  # type: ignore[arg-type]
                assert await finish(ws) == 1
        samples = await metric_samples(url)
    assert samples[("stream_sessions_rejected_total", (("reason", "origin"),))] == 1


@pytest.mark.e2e
async def test_cors_follows_the_allowed_origins() -> None:
    """/health and /v1/auth/grant answer CORS for allowed origins only (the preflight lets them send
    Authorization); an open server keeps '*' on /health."""
    config = auth_config(allowed_origins="https://app.example")
    async with running_server(FakeEngine(), config) as (_, url):
        base = http(url)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/health", headers={"Origin": "https://app.example"}) as r:
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert r.headers["Vary"] == "Origin" and (await r.json())["auth_required"] is True
            async with session.get(f"{base}/health", headers={"Origin": "https://evil.example"}) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
            preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
            async with session.options(f"{base}/v1/auth/grant", headers=preflight) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
                assert "POST" in r.headers["Access-Control-Allow-Methods"]
            async with session.options(
                f"{base}/v1/auth/grant", headers={**preflight, "Origin": "https://evil.example"}
            ) as r:
                assert r.status == 403 and (await r.json())["code"] == "ORIGIN_NOT_ALLOWED"
                assert "Access-Control-Allow-Origin" not in r.headers
        status, body = await grant(url, f"Token {KEY}", Origin="https://app.example")
        assert status == 200 and body["access_token"]
        status, body = await grant(url, f"Token {KEY}", Origin="https://evil.example")
        assert (status, body["code"]) == (403, "ORIGIN_NOT_ALLOWED")
    async with running_server(FakeEngine()) as (_, url):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{http(url)}/health", headers={"Origin": "https://a.example"}) as r:
                assert r.headers["Access-Control-Allow-Origin"] == "*"
                assert (await r.json())["auth_required"] is False


@pytest.mark.e2e
async def test_an_open_server_still_selects_the_subprotocol_a_browser_offers() -> None:
    """Without keys, a client offering (bearer, TOKEN) connects and the server selects bearer."""
    async with running_server(FakeEngine()) as (_, url):
        async with connect(f"{url}/v1/listen", subprotocols=["bearer", "a.b.c"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            assert await finish(ws) == 1


class _LocalModelEngine(FakeEngine):
    """A fake whose model is a local folder, with extras naming files and library versions."""

    def __init__(self, folder: Path) -> None:
        super().__init__(fallback_reason=f"hub unreachable: OSError at {folder}/config.yaml")
        self._info = replace(
            self._info,
            model=str(folder),
            extras={
                "backend": "onnx",
                "threads": "2",
                "onnxruntime": "1.99.0",
                "torch": "9.9.9",
                "onnx_file": "model_quant.onnx",
                "cache": f"{folder}/onnx",
                "workers": "2",
            },
        )


@pytest.mark.e2e
async def test_health_metadata_and_errors_leak_no_paths_versions_or_exceptions(tmp_path: Path) -> None:
    """With a model loaded from a local folder and extras naming files and versions, /health and
    Metadata show neither; a load that failed with an exception naming a path shows it neither in
    /health nor in the MODEL_FAILED refusal."""
    folder = tmp_path / "secret-models" / "SenseVoiceSmall"
    folder.mkdir(parents=True)
    async with running_server(_LocalModelEngine(folder)) as (_, url):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{http(url)}/health") as r:
                health = await r.text()
        async with connect(f"{url}/v1/listen") as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            metadata = json.dumps((await collect(ws)).of_type("Metadata"))
    for text in (health, metadata):
        assert "secret-models" not in text and str(tmp_path) not in text
        assert "1.99.0" not in text and "9.9.9" not in text and "onnx_file" not in text
        assert "OSError" not in text
    model = json.loads(health)["model"]
    assert model["model"] == "local folder" and model["backend"] == "onnx" and model["workers"] == "2"
    assert model["fallback"] is True and "log" in model["fallback_reason"]

    def broken() -> Engine:
        raise OSError(f"No such file: {folder}/model.pt")

    async with running_server(engine_loader=broken, wait_ready=False) as (server, url):
        with pytest.raises(RuntimeError):
            await server.wait_ready(10)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{http(url)}/health") as r:
                health = await r.text()
        status, body, headers = await refusal(f"{url}/v1/listen")
    assert status == 503 and body["code"] == "MODEL_FAILED"
    for text in (health, json.dumps(body), headers["dg-error"]):
        assert "secret-models" not in text and "No such file" not in text and "model.pt" not in text
    assert json.loads(health)["error"] == "The model could not be loaded; the server's log says why."


@pytest.mark.e2e
async def test_a_hub_model_id_stays_visible() -> None:
    """A hub id is public and shown as it is (only paths are hidden)."""
    engine = FakeEngine()
    engine._info = replace(engine._info, model="iic/SenseVoiceSmall")
    async with running_server(engine) as (_, url):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{http(url)}/health") as r:
                assert (await r.json())["model"]["model"] == "iic/SenseVoiceSmall"


def test_server_refuses_a_bad_keys_file_at_construction(tmp_path: Path) -> None:
    """Server() reads the keys file, so a wrong one stops the server before it listens."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("x\n")
    with pytest.raises(ConfigError, match="line 1"):
        Server(Config(auth=AuthConfig(api_keys_file=str(keys_file))), engine=FakeEngine())
