"""Fair limits on who may hold streams: per client address and per API key (README, "Limits").

Pure: no sockets. The transport asks :meth:`FairShare.refusal` at the handshake, then calls
:meth:`FairShare.open` and :meth:`FairShare.close` around the stream.

A client's address is the socket's peer, unless that peer is one of the operator's
``--trusted-proxies``: then it is the right-most ``X-Forwarded-For`` entry that is not itself a
trusted proxy (what nginx's ``real_ip_recursive`` does). An untrusted peer cannot choose its address
by sending the header.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str, name: str = "trusted_proxies") -> tuple[Network, ...]:
    """Comma-separated addresses or CIDR blocks (``10.0.0.0/8, 127.0.0.1, ::1``).

    Raises:
        ConfigError: naming ``name`` and the entry that is not an address.
    """
    networks: list[Network] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {entry!r} is not an IP address or CIDR block") from None
    return tuple(networks)


def _trusted(address: str, trusted: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def is_trusted(peer: str | None, trusted: tuple[Network, ...]) -> bool:
    """Whether ``peer`` is one of the trusted proxies (whose forwarded headers are believed)."""
    return peer is not None and _trusted(peer, trusted)


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The address a stream counts against.

    Args:
        peer: the socket's remote address (None for a Unix socket).
        forwarded_for: every ``X-Forwarded-For`` header value, in order.
        trusted: the proxies whose ``X-Forwarded-For`` is believed.

    Returns:
        The peer, or when the peer is trusted the right-most forwarded address that is not trusted
        (the left-most when all are); ``"unknown"`` without a peer.
    """
    address = peer or "unknown"
    if not trusted or not _trusted(address, trusted):
        return address
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # a garbled header from a trusted proxy: count the proxy itself
        address = hop
        if not _trusted(hop, trusted):
            break
    return address


@dataclass(frozen=True)
class Refusal:
    """Why a stream may not open: the machine code, and a sentence for the client."""

    code: str
    description: str
    reason: str
    """Metric label: ``per_ip`` or ``per_key``."""


class FairShare:
    """Concurrent streams per client address and per key.

    Args:
        max_per_ip: streams one address may hold at once; 0 for no limit.
        max_per_key: streams one key (and the tokens granted from it) may hold at once, for keys
            that set no limit of their own; 0 for no limit.
    """

    def __init__(self, max_per_ip: int = 0, max_per_key: int = 0) -> None:
        self.max_per_ip = max_per_ip
        self.max_per_key = max_per_key
        self._per_ip: Counter[str] = Counter()
        self._per_key: Counter[str] = Counter()

    def streams_of(self, ip: str) -> int:
        return self._per_ip[ip]

    def streams_of_key(self, key: str) -> int:
        return self._per_key[key]

    def refusal(self, ip: str, key: str | None, key_max: int | None = None) -> Refusal | None:
        """None when ``ip`` (with ``key``, if any) may open one more stream.

        Args:
            ip: the client's address (:func:`client_address`).
            key: the name of the API key the stream authenticated with, if any.
            key_max: that key's own limit (from the keys file), overriding ``max_per_key``.
        """
        if self.max_per_ip and self._per_ip[ip] >= self.max_per_ip:
            return Refusal(
                "TOO_MANY_SESSIONS",
                f"This address already holds {self._per_ip[ip]} streams, the most this server allows "
                "one client; close one first.",
                "per_ip",
            )
        limit = key_max if key_max is not None else self.max_per_key
        if key is not None and limit and self._per_key[key] >= limit:
            return Refusal(
                "TOO_MANY_SESSIONS",
                f"This API key already holds {self._per_key[key]} streams, its limit; close one first.",
                "per_key",
            )
        return None

    def open(self, ip: str, key: str | None) -> None:
        self._per_ip[ip] += 1
        if key is not None:
            self._per_key[key] += 1

    def close(self, ip: str, key: str | None) -> None:
        """The stream opened with ``open(ip, key)`` is gone (call once per ``open``)."""
        for counter, name in ((self._per_ip, ip), (self._per_key, key)):
            if name is None:
                continue
            counter[name] -= 1
            if counter[name] <= 0:
                del counter[name]  # nothing grows with the number of addresses ever seen

    @property
    def addresses(self) -> int:
        """Addresses holding at least one stream."""
        return len(self._per_ip)
