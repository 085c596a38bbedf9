"""Who may stream: API keys, short-lived grant tokens and allowed origins (README, "Authentication").

Pure: no sockets and no aiohttp. The transport hands :meth:`Authenticator.authenticate` the request's
``Authorization``, ``Sec-WebSocket-Protocol``, ``Origin`` and ``Host`` headers and gets back a
:class:`Principal` (and the subprotocol its handshake must select) or an
:class:`~stream_server.errors.AuthError` with the HTTP status and a stable code.

- **API keys** come from ``--api-key`` (repeatable; ``STREAM_SERVER_API_KEYS``, comma-separated) and
  ``--api-keys-file``: one entry per line, ``KEY`` or ``NAME:KEY``, optionally followed by
  ``max_sessions=N``; ``#`` starts a comment. A key is 16 to 512 letters, digits, ``-`` or ``_``; an
  unnamed key is called ``key-`` plus the first 8 hex digits of its SHA-256, so logs and metrics can
  name it without showing it. Keys are compared in constant time (their SHA-256, with
  :func:`hmac.compare_digest`, against every configured key).
- **Grant tokens** (``POST /v1/auth/grant``, Deepgram's shape) are JWTs signed with HMAC-SHA256: the
  key's name, when they were issued and when they expire; nothing is stored on the server. The secret
  is ``--auth-secret``, or when unset one derived from the configured keys (so replicas with the same
  keys accept each other's tokens, and tokens survive a restart). A token is valid while its signature
  matches, it has not expired, and the key that granted it is still configured.
- **Origins**: a browser says which page opened a connection (``Origin``); requests without one (not
  browsers) and pages from the server's own origin always pass; others must be in
  ``--allowed-origins`` (``*`` for any). With the list empty, any origin passes while no key is
  configured (the server is open anyway) and none but the server's own once keys are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from .errors import AuthError, BadRequest, ConfigError

if TYPE_CHECKING:
    from .config import AuthConfig

logger = logging.getLogger(__name__)

KEY_RE = re.compile(r"[A-Za-z0-9_-]{16,512}")
"""An API key: what ``secrets.token_urlsafe(32)`` makes, or hex. No ``.``, so a key is never mistaken for
a token; only characters a browser accepts in a WebSocket subprotocol."""
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A key's name, as it appears in logs and in the ``key`` label of metrics."""
ANONYMOUS_NAME = "anonymous"
"""Who a stream on a server without keys is (a reserved name)."""
MAX_SESSIONS_LIMIT = 100000

DEFAULT_TOKEN_TTL_S = 30
"""A grant token's life when the request does not say (Deepgram's default)."""
MIN_TOKEN_TTL_S = 1
MAX_TOKEN_TTL_S = 3600
"""Bounds of ``ttl_seconds`` in a grant request (Deepgram's)."""
MAX_CLOCK_SKEW_S = 60
"""A token issued this far in the future (a replica whose clock runs ahead) is still accepted."""
MAX_TOKEN_CHARS = 4096
MAX_GRANT_BODY_BYTES = 4096
MIN_SECRET_CHARS = 32
TOKEN_ISSUER = "stream-server"

SCHEMES = ("token", "bearer")
"""``Authorization`` schemes and WebSocket subprotocols that carry credentials: ``token`` for API keys
(Deepgram's), ``bearer`` for grant tokens. Either takes either: keys and tokens differ in shape."""

WWW_AUTHENTICATE = 'Token realm="stream-server", Bearer realm="stream-server"'
"""The challenge sent with every 401."""

# Codes (README, "Authentication": what a refused client sees).
AUTH_REQUIRED = "AUTH_REQUIRED"
INVALID_AUTH = "INVALID_AUTH"
TOKEN_EXPIRED = "TOKEN_EXPIRED"
ORIGIN_NOT_ALLOWED = "ORIGIN_NOT_ALLOWED"
API_KEY_REQUIRED = "API_KEY_REQUIRED"
AUTH_NOT_CONFIGURED = "AUTH_NOT_CONFIGURED"

Method = Literal["none", "key", "token"]


@dataclass(frozen=True)
class ApiKey:
    """One configured key.

    Attributes:
        name: what logs and metrics call it (never the key itself).
        key: the secret (left out of ``repr``).
        max_sessions: streams this key, with every token granted from it, may hold at once; None for
            the server's default.
    """

    name: str
    key: str = field(repr=False)
    max_sessions: int | None = None


@dataclass(frozen=True)
class Principal:
    """Who a request is, once authenticated; the transport keeps it as ``request["principal"]``.

    Attributes:
        name: the key's name (a token counts as the key that granted it), or ``anonymous`` on a server
            without keys.
        max_sessions: that key's own limit on streams at once; None for the server's default.
        method: ``key`` (an API key), ``token`` (a grant token) or ``none`` (a server without keys).
    """

    name: str
    max_sessions: int | None = None
    method: Method = "key"


ANONYMOUS = Principal(ANONYMOUS_NAME, None, "none")


def key_name_for(key: str) -> str:
    """The stable, non-secret name of an unnamed key: ``key-`` and 8 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------------
# Keys


def parse_key_entry(entry: str, where: str) -> ApiKey:
    """One key entry: ``KEY`` or ``NAME:KEY``, optionally followed by ``max_sessions=N``.

    Args:
        entry: the text (a line of the keys file without its comment, or one ``--api-key``).
        where: names the entry in errors, e.g. ``"api_keys_file keys.txt line 3"``.

    Raises:
        ConfigError: starting with ``where`` and saying what is wrong; it never repeats the entry's
            text, which may hold a key.
    """
    fields = entry.split()
    if not fields:
        raise ConfigError(f"{where}: empty key entry")
    head, options = fields[0], fields[1:]
    name, colon, key = head.partition(":")
    if not colon:
        name, key = "", head
    if not KEY_RE.fullmatch(key):
        raise ConfigError(
            f"{where}: a key must be 16 to 512 characters of letters, digits, '-' and '_' (make one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'); write NAME:KEY to name it"
        )
    if colon and not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{where}: the name before ':' must be 1 to 64 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit"
        )
    if name == ANONYMOUS_NAME:
        raise ConfigError(f"{where}: the name {ANONYMOUS_NAME!r} is reserved for streams without a key")
    max_sessions: int | None = None
    for option in options:
        option_name, equals, value = option.partition("=")
        if option_name != "max_sessions" or not equals:
            raise ConfigError(f"{where}: after the key only max_sessions=N may follow")
        if max_sessions is not None:
            raise ConfigError(f"{where}: max_sessions is given twice")
        if not value.isdigit() or not 1 <= int(value) <= MAX_SESSIONS_LIMIT:
            raise ConfigError(f"{where}: max_sessions must be a whole number 1..{MAX_SESSIONS_LIMIT}")
        max_sessions = int(value)
    return ApiKey(name or key_name_for(key), key, max_sessions)


def parse_keys_file(text: str, source: str) -> list[tuple[ApiKey, str]]:
    """The entries of a keys file, each with where it came from (``source line N``).

    Blank lines are skipped; ``#`` starts a comment that runs to the end of the line (keys and names
    never contain ``#``).

    Raises:
        ConfigError: naming ``source`` and the line.
    """
    entries: list[tuple[ApiKey, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            where = f"{source} line {number}"
            entries.append((parse_key_entry(line, where), where))
    return entries


def read_keys_file(path: str) -> list[tuple[ApiKey, str]]:
    """Read ``--api-keys-file``; warn when other users may read it.

    Raises:
        ConfigError: the file cannot be read, holds no key, or a line is wrong.
    """
    source = f"api_keys_file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{source}: cannot be read ({why})") from None
    entries = parse_keys_file(text, source)
    if not entries:
        # Fail closed: an operator who names a keys file means the server to require keys.
        raise ConfigError(f"{source}: holds no key (an empty file would leave the server open)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s can be read by other users (mode %o): chmod 600 it", source, stat.S_IMODE(mode))
    return entries


def collect_keys(api_keys: Sequence[str], api_keys_file: str) -> tuple[ApiKey, ...]:
    """Every configured key: the ``--api-key`` entries, then the file's.

    Raises:
        ConfigError: an entry is wrong, or two entries share a name or a key.
    """
    entries = [
        (parse_key_entry(e, f"api_keys entry {i}"), f"api_keys entry {i}") for i, e in enumerate(api_keys, 1)
    ]
    if api_keys_file:
        entries += read_keys_file(api_keys_file)
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for key, where in entries:
        if key.name in names:
            raise ConfigError(f"{where}: the key name {key.name!r} is already used ({names[key.name]})")
        digest = hashlib.sha256(key.key.encode()).digest()
        if digest in digests:
            raise ConfigError(f"{where}: the same key is already configured ({digests[digest]})")
        names[key.name] = where
        digests[digest] = where
    return tuple(key for key, _ in entries)


class KeyRing:
    """The configured keys, looked up in constant time."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys = tuple(keys)
        self._digests = tuple((hashlib.sha256(k.key.encode()).digest(), k) for k in self.keys)
        self._by_name = {k.name: k for k in self.keys}

    def __len__(self) -> int:
        return len(self.keys)

    def match(self, presented: str) -> ApiKey | None:
        """The key equal to ``presented``, or None; compares digests of fixed length with every key,
        without stopping at a match, so the time taken says nothing about the keys."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: ApiKey | None = None
        for candidate, key in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = key
        return found

    def by_name(self, name: str) -> ApiKey | None:
        """The key called ``name`` (the one a token names), or None."""
        return self._by_name.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        """Every key's name, in configuration order."""
        return tuple(k.name for k in self.keys)


# --------------------------------------------------------------------------------------------------
# Grant tokens


def derive_secret(keys: Sequence[ApiKey]) -> bytes:
    """The token secret when ``--auth-secret`` is not set: HMAC-SHA256 over every configured key,
    sorted, under a fixed label. The same keys give the same secret on every replica and after every
    restart; changing the keys invalidates outstanding tokens (they live seconds). Whoever holds all
    keys could forge tokens, but such a person can stream anyway."""
    material = b"\x00".join(sorted(k.key.encode() for k in keys))
    return hmac.new(b"stream-server grant-token secret v1", material, hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_TOKEN_HEADER = _b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
"""Every token this server issues starts with this header; anything else (``alg: none``...) is refused."""


def looks_like_token(credential: str) -> bool:
    """A JWT has three dot-separated parts; an API key has no dot."""
    return credential.count(".") == 2


class TokenSigner:
    """Issues and verifies grant tokens: HS256 JWTs carrying the key's name (``sub``), ``iat``,
    ``exp``, ``iss`` and a random ``jti``.

    Args:
        secret: the HMAC key.
        clock: seconds since the epoch (tests inject one).
    """

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret = secret
        self.clock = clock

    def _sign(self, signing_input: str) -> str:
        return _b64encode(hmac.new(self._secret, signing_input.encode("ascii"), hashlib.sha256).digest())

    def issue(self, name: str, ttl_s: int) -> str:
        """A token for the key called ``name``, valid for ``ttl_s`` seconds from now."""
        issued = int(self.clock())
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": name,
            "iat": issued,
            "exp": issued + ttl_s,
            "jti": secrets.token_hex(8),
        }
        payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{_TOKEN_HEADER}.{payload}"
        return f"{signing_input}.{self._sign(signing_input)}"

    def verify(self, token: str) -> str:
        """The name of the key that granted ``token``.

        Raises:
            AuthError: 401 ``INVALID_AUTH`` (not a token of this server's, or altered: the signature
                is checked before anything in it is believed) or ``TOKEN_EXPIRED``.
        """
        invalid = AuthError(
            401,
            INVALID_AUTH,
            "The token is not valid here: it was not issued by this server (or its replicas), or it was "
            "altered. Get a new one from POST /v1/auth/grant.",
        )
        if len(token) > MAX_TOKEN_CHARS or not token.isascii() or not looks_like_token(token):
            raise invalid
        header, payload, signature = token.split(".")
        if not hmac.compare_digest(header, _TOKEN_HEADER):
            raise invalid
        if not hmac.compare_digest(signature, self._sign(f"{header}.{payload}")):
            raise invalid
        try:
            claims = json.loads(_b64decode(payload))
        except (ValueError, binascii.Error):
            raise invalid from None
        if not isinstance(claims, dict):
            raise invalid
        name, issued, expires = claims.get("sub"), claims.get("iat"), claims.get("exp")
        if (
            claims.get("iss") != TOKEN_ISSUER
            or not isinstance(name, str)
            or type(issued) is not int
            or type(expires) is not int
            or not 0 < expires - issued <= MAX_TOKEN_TTL_S
        ):
            raise invalid
        now = self.clock()
        if issued > now + MAX_CLOCK_SKEW_S:
            raise invalid
        if now >= expires:
            raise AuthError(
                401,
                TOKEN_EXPIRED,
                f"The token expired {math.ceil(now - expires)} s ago (tokens live {expires - issued} s): "
                "get a new one from POST /v1/auth/grant just before connecting.",
            )
        return name


def parse_grant_body(body: bytes) -> int:
    """The life of the token a ``POST /v1/auth/grant`` asks for: ``{"ttl_seconds": N}`` or nothing.

    Returns:
        Seconds, ``DEFAULT_TOKEN_TTL_S`` when the body is empty or does not say.

    Raises:
        BadRequest: ``INVALID_JSON`` (not a JSON object) or ``INVALID_PARAMETER`` (``ttl_seconds``
            outside 1..3600, or the body too large).
    """
    if len(body) > MAX_GRANT_BODY_BYTES:
        raise BadRequest("INVALID_PARAMETER", f"The request body is over {MAX_GRANT_BODY_BYTES} bytes.")
    if not body.strip():
        return DEFAULT_TOKEN_TTL_S
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(
            "INVALID_JSON", 'The body must be JSON, such as {"ttl_seconds": 60}, or empty.'
        ) from None
    if not isinstance(parsed, dict):
        raise BadRequest("INVALID_JSON", 'The body must be a JSON object, such as {"ttl_seconds": 60}.')
    ttl = parsed.get("ttl_seconds", DEFAULT_TOKEN_TTL_S)
    if isinstance(ttl, float) and ttl.is_integer():
        ttl = int(ttl)
    if type(ttl) is not int or not MIN_TOKEN_TTL_S <= ttl <= MAX_TOKEN_TTL_S:
        raise BadRequest(
            "INVALID_PARAMETER",
            f"ttl_seconds must be a whole number of seconds from {MIN_TOKEN_TTL_S} to {MAX_TOKEN_TTL_S}.",
        )
    return ttl


# --------------------------------------------------------------------------------------------------
# Origins

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(text: str) -> str:
    """``scheme://host[:port]`` in lower case, without a default port.

    Raises:
        ValueError: ``text`` is not an http(s) origin (a path, a query or credentials in it count
            as not).
    """
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        raise ValueError(text)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(text)
    port = parts.port  # raises ValueError when not a number
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else "")


def parse_allowed_origins(text: str) -> tuple[str, ...]:
    """``--allowed-origins``: comma-separated origins, or ``*``.

    Raises:
        ConfigError: naming ``allowed_origins`` and the entry that is not an origin.
    """
    origins: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry == "*":
            origins.append("*")
            continue
        try:
            origins.append(normalize_origin(entry))
        except ValueError:
            raise ConfigError(
                f"allowed_origins: {entry!r} is not an origin: give scheme://host[:port] such as "
                "https://captions.example.org (no path), or * for any"
            ) from None
    return tuple(origins)


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` is the server's own: its host and port are the request's ``Host``."""
    if not host:
        return False
    try:
        page = urlsplit(origin)
        scheme = page.scheme.lower()
        page_port = page.port or _DEFAULT_PORTS.get(scheme)
        asked = urlsplit("//" + host.strip())
        asked_port = asked.port
    except ValueError:
        return False
    if not page.hostname or not asked.hostname or page.hostname.lower() != asked.hostname.lower():
        return False
    if asked_port is None:  # Host leaves out the scheme's default port
        return page.port is None or page.port == _DEFAULT_PORTS.get(scheme)
    return page_port == asked_port


@dataclass(frozen=True)
class OriginPolicy:
    """Which browser pages may connect, read ``/health`` and ask for grants.

    Attributes:
        origins: allowed origins, normalized.
        any_origin: every origin passes (``*``, or no list on a server without keys).
    """

    origins: frozenset[str] = frozenset()
    any_origin: bool = True

    @classmethod
    def from_setting(cls, allowed_origins: str, keys_configured: bool) -> OriginPolicy:
        """The policy of ``--allowed-origins``; empty means any origin only when no key is configured.

        Raises:
            ConfigError: an entry is not an origin.
        """
        origins = parse_allowed_origins(allowed_origins)
        any_origin = "*" in origins or (not origins and not keys_configured)
        return cls(frozenset(o for o in origins if o != "*"), any_origin)

    def allows(self, origin: str | None, host: str | None) -> bool:
        """A request without ``Origin`` (not a browser), from the server's own origin, or from an
        allowed one."""
        if origin is None or self.any_origin:
            return True
        if _same_origin(origin, host):
            return True
        try:
            return normalize_origin(origin) in self.origins
        except ValueError:  # "null" (a sandboxed frame, a file:// page) or garbage
            return False

    def describe(self) -> str:
        """Which pages pass, for the start-up log."""
        if self.any_origin:
            return "any origin"
        listed = ", ".join(sorted(self.origins))
        return "the server's own origin" + (f" and {listed}" if listed else " only")


# --------------------------------------------------------------------------------------------------
# The whole check


def is_loopback_host(host: str) -> bool:
    """Whether binding to ``host`` keeps the server to this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _offered_scheme(subprotocols: str | None) -> tuple[int, list[str]]:
    offered = [p.strip() for p in (subprotocols or "").split(",") if p.strip()]
    for i, proto in enumerate(offered):
        if proto.lower() in SCHEMES:
            return i, offered
    return -1, offered


class Authenticator:
    """API keys, the token signer and the origin policy, checked together.

    Args:
        keys: the configured keys; none means an open server.
        secret: signs grant tokens; None derives one from the keys.
        allowed_origins: ``--allowed-origins``.
        clock: seconds since the epoch, for token times.
    """

    def __init__(
        self,
        keys: Sequence[ApiKey] = (),
        *,
        secret: bytes | None = None,
        allowed_origins: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = KeyRing(keys)
        self.origins = OriginPolicy.from_setting(allowed_origins, bool(self.keys))
        self.signer = TokenSigner(secret if secret else derive_secret(self.keys.keys), clock)

    @classmethod
    def from_config(cls, config: AuthConfig, clock: Callable[[], float] = time.time) -> Authenticator:
        """Keys from the flags and the keys file (read now), the secret and the origins.

        Raises:
            ConfigError: a key entry or the keys file is wrong.
        """
        keys = collect_keys(config.api_keys, config.api_keys_file)
        secret = config.auth_secret.encode() if config.auth_secret else None
        return cls(keys, secret=secret, allowed_origins=config.allowed_origins, clock=clock)

    @property
    def enabled(self) -> bool:
        """Whether streams need credentials (at least one key is configured)."""
        return bool(self.keys)

    def check_origin(self, origin: str | None, host: str | None) -> None:
        """Whether a browser page (``Origin``) may use the server (``Host``: the server's own origin).

        Raises:
            AuthError: 403 ``ORIGIN_NOT_ALLOWED`` for a page the policy does not allow.
        """
        if not self.origins.allows(origin, host):
            raise AuthError(
                403,
                ORIGIN_NOT_ALLOWED,
                f"Pages from {str(origin)[:200]!r} may not use this server: its operator lists the origins "
                "allowed with --allowed-origins.",
            )

    def authenticate(
        self,
        authorization: str | None,
        subprotocols: str | None,
        *,
        query_credentials: bool = False,
    ) -> tuple[Principal, str | None]:
        """Who a ``/v1/listen`` handshake is, and the subprotocol to select.

        Credentials come from ``Authorization: Token KEY`` / ``Bearer TOKEN`` or, for browsers that
        cannot set headers on a WebSocket, the subprotocols ``token, KEY`` / ``bearer, TOKEN``. The
        server selects the ``token`` or ``bearer`` subprotocol the client offered (a browser fails a
        handshake that offered subprotocols and got none back), also on a server without keys, where
        credentials are not checked.

        Args:
            authorization: the ``Authorization`` header, if any.
            subprotocols: the ``Sec-WebSocket-Protocol`` header, if any.
            query_credentials: the query has ``token`` or ``access_token`` (refused with a hint:
                URLs end up in logs).

        Returns:
            The principal, and the subprotocol to select (exactly as offered) or None.

        Raises:
            AuthError: 401 ``AUTH_REQUIRED``, ``INVALID_AUTH`` or ``TOKEN_EXPIRED``.
        """
        index, offered = _offered_scheme(subprotocols)
        selected = offered[index] if index >= 0 else None
        if not self.enabled:
            return ANONYMOUS, selected
        if authorization is not None and authorization.strip():
            scheme, _, credential = authorization.strip().partition(" ")
            scheme = scheme.lower()
            credential = credential.strip()
        elif selected is not None:
            scheme = selected.lower()
            credential = offered[index + 1] if index + 1 < len(offered) else ""
        else:
            hint = (
                " Credentials in the query string are not accepted (URLs end up in logs)."
                if query_credentials
                else ""
            )
            raise AuthError(
                401,
                AUTH_REQUIRED,
                "This server requires an API key or a token: send the header 'Authorization: Token "
                "KEY' or 'Authorization: Bearer TOKEN', or from a browser the WebSocket subprotocols "
                f"'token, KEY' or 'bearer, TOKEN'.{hint}",
            )
        return self._principal(scheme, credential), selected

    def authenticate_key(self, authorization: str | None) -> Principal:
        """Who a ``POST /v1/auth/grant`` is: only an API key may ask for a token.

        Raises:
            AuthError: 401 ``AUTH_REQUIRED`` / ``INVALID_AUTH``, or 403 ``API_KEY_REQUIRED`` for a
                valid token (a token cannot mint tokens, or it would live for ever).
        """
        if authorization is None or not authorization.strip():
            raise AuthError(
                401, AUTH_REQUIRED, "A grant needs an API key: send the header 'Authorization: Token KEY'."
            )
        scheme, _, credential = authorization.strip().partition(" ")
        principal = self._principal(scheme.lower(), credential.strip())
        if principal.method != "key":
            raise AuthError(
                403,
                API_KEY_REQUIRED,
                "A grant needs an API key ('Authorization: Token KEY'); a token cannot be exchanged for "
                "another.",
            )
        return principal

    def _principal(self, scheme: str, credential: str) -> Principal:
        if scheme not in SCHEMES:
            raise AuthError(
                401, INVALID_AUTH, "Unsupported authorization scheme: use 'Token KEY' or 'Bearer TOKEN'."
            )
        if not credential:
            raise AuthError(401, INVALID_AUTH, f"No credential follows '{scheme}'.")
        if looks_like_token(credential):
            name = self.signer.verify(credential)
            key = self.keys.by_name(name)
            if key is None:
                raise AuthError(
                    401, INVALID_AUTH, "The key that granted this token is no longer accepted by this server."
                )
            return Principal(key.name, key.max_sessions, "token")
        key = self.keys.match(credential)
        if key is None:
            raise AuthError(401, INVALID_AUTH, "The API key is not valid for this server.")
        return Principal(key.name, key.max_sessions, "key")

    def issue(self, principal: Principal, ttl_s: int) -> str:
        """A grant token for ``principal``'s key."""
        return self.signer.issue(principal.name, ttl_s)

    def cors_headers(
        self, origin: str | None, host: str | None, *, preflight: bool = False
    ) -> dict[str, str]:
        """CORS headers for ``/health`` and ``/v1/auth/grant``, following the origin policy: ``*`` when
        any origin may, the page's own origin when it is allowed, none otherwise."""
        headers: dict[str, str] = {}
        if self.origins.any_origin:
            headers["Access-Control-Allow-Origin"] = "*"
        else:
            headers["Vary"] = "Origin"
            if origin is not None and self.origins.allows(origin, host):
                headers["Access-Control-Allow-Origin"] = origin
        if preflight and "Access-Control-Allow-Origin" in headers:
            headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            headers["Access-Control-Max-Age"] = "600"
        return headers

    def describe(self) -> str:
        """One line for the start-up log: how many keys (by name), the origin policy."""
        if not self.enabled:
            return f"no API keys: streams need no credentials; browser pages from {self.origins.describe()}"
        return (
            f"{len(self.keys)} API key(s) ({', '.join(self.keys.names)}); browser pages from "
            f"{self.origins.describe()}"
        )
