"""Every error this package raises or reports, in one hierarchy.

::

    StreamServerError
    ├── ConfigError            a setting is invalid (start-up; names the field)
    ├── EngineError            the model could not be loaded or failed on a batch
    │   ├── ModelDownloadError a hub could not deliver the model (``--model auto`` then falls back)
    │   ├── EngineTimeout      a model call ran past ``engine_call_timeout_s``; its requests fail
    │   ├── BatcherFailed      a batching worker failed outside the model (a bug, logged)
    │   └── BatcherClosed      the server is shutting down; no more requests are taken
    ├── InterimSkipped         an interim request was dropped because the model is busy
    └── ClientError            something a client sent; carries a stable code and a close code
        ├── BadRequest         invalid query parameters (HTTP 400 at the handshake)
        ├── AuthError          missing or wrong credentials, a page's Origin not allowed (401/403)
        └── ProtocolViolation  bad input on an open stream (an ``Error`` event, maybe a close)

Clients never see tracebacks: a session turns a :class:`ClientError` into an ``Error`` event with
``code`` (machine-readable, stable) and ``description`` (a sentence a person can act on); anything
unexpected becomes ``INTERNAL_ERROR`` and close code 1011, with the traceback logged once.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes this server uses (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class StreamServerError(Exception):
    """Base of everything raised here."""


class ConfigError(StreamServerError, ValueError):
    """A setting is invalid; the message names the field."""


class EngineError(StreamServerError):
    """The model could not be loaded, or failed on a batch."""


class ModelDownloadError(EngineError):
    """A model could not be fetched from its hub (network down, unknown id...)."""


class EngineTimeout(EngineError):
    """A model call ran longer than ``engine_call_timeout_s``: its requests fail with this while the call
    (a thread, which cannot be stopped unless the engine can abort) goes on to its end."""


class BatcherFailed(EngineError):
    """A batching worker failed outside the model call (a bug, logged with its traceback): the requests
    it held fail with this. After repeated failures the batcher stops and every request fails."""


class BatcherClosed(EngineError):
    """The batcher is stopping; no more requests are taken."""


class InterimSkipped(StreamServerError):
    """An interim request was dropped because the model is busy; the session backs off."""


class ClientError(StreamServerError):
    """Something a client sent is wrong.

    Attributes:
        code: stable machine-readable code, e.g. ``"INVALID_JSON"``.
        description: one sentence a person can act on.
        close_code: the WebSocket close code when the stream cannot go on, else None.
    """

    def __init__(self, code: str, description: str, close_code: CloseCode | None = None) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
        self.close_code = close_code


class BadRequest(ClientError):
    """Invalid query parameters: answered with HTTP 400 before the WebSocket opens."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(code, description, None)


class AuthError(ClientError):
    """A request is refused for who sent it (README, "Authentication"), before any WebSocket opens.

    Attributes:
        status: the HTTP status: 401 (no credentials, or wrong or expired ones), 403 (a browser page
            from an origin that is not allowed, or a token where a key is needed), 404 (grants asked of
            a server without keys).
        reason: the metrics label (``stream_auth_failures_total{reason}``): the code in lower case.
    """

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(code, description, None)
        self.status = status
        self.reason = code.lower()


class ProtocolViolation(ClientError):
    """Bad input on an open stream."""
