"""Where the notice sender may post a customer's webhook. Whoever writes a Customer names its URL, and
the webhook server holds a service account inside the cluster: a URL must not reach the cloud's metadata
service, the server itself, the API server or any other in-cluster or private address (SSRF).

The addresses are checked where the connection is made: a name's through the connector's resolver (the
connector connects to what it returns, so a name that resolves elsewhere by then, DNS rebinding, gets no
further), a URL's own address before its request starts (the connector resolves no address).
NOTIFY_WEBHOOK_ALLOWED_CIDRS allows ranges on purpose (a receiver in the cluster or a private network).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from types import SimpleNamespace
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

log = logging.getLogger(__name__)

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

# NAT64's well-known prefix: its gateway connects to the IPv4 address in the last 32 bits.
_NAT64: Final = ip_network("64:ff9b::/96")
# Not globally reachable (IANA's special-purpose registries), yet is_global to Python 3.11: the IPv4
# dummy address, IPv6's deprecated site-local range (routed inside a site) and its documentation range.
_NOT_GLOBAL: Final = (ip_network("192.0.0.8/32"), ip_network("fec0::/10"), ip_network("3fff::/20"))


class AddressRefused(Exception):
    """A webhook's host is, or resolves only to, addresses the sender does not post to. The message
    names neither the addresses nor a port: a Customer's writer may read it (the delivery's last error)."""

    def __init__(self, host: str) -> None:
        super().__init__(
            f"refused: {host} resolves to a private address (loopback, link-local, private, multicast or "
            "otherwise not public); NOTIFY_WEBHOOK_ALLOWED_CIDRS allows one on purpose"
        )
        self.host = host


def _carried_ipv4(address: Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one reaches in the end (IPv4-mapped, 6to4, NAT64), if any."""
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def may_post_to(address: Address, allowed: Iterable[Network]) -> bool:
    """An address `allowed` holds, else a public unicast one (an IPv6 address carrying an IPv4 one is
    judged by that one)."""
    carried = _carried_ipv4(address)
    if any(address in network or (carried is not None and carried in network) for network in allowed):
        return True
    reached = carried or address
    if any(reached in network for network in _NOT_GLOBAL):
        return False
    return reached.is_global and not (reached.is_multicast or reached.is_reserved)


def _may_connect(host: str, allowed: Iterable[Network]) -> bool:
    try:
        return may_post_to(ip_address(host), allowed)
    except ValueError:  # no address Python reads, which the socket might still (127.1): refused
        return False


def _is_address(host: str) -> bool:
    """What aiohttp connects to without resolving (its own test): digits and dots, or a colon."""
    return ":" in host or host.replace(".", "").isdigit()


class PublicResolver(AbstractResolver):
    """A resolver's answer (the system's, getaddrinfo, as aiohttp's default without aiodns) less the
    addresses `may_post_to` refuses; none left is AddressRefused."""

    def __init__(self, allowed: Iterable[Network], resolver: AbstractResolver | None = None) -> None:
        self._allowed = tuple(allowed)
        # The system's: its close() is nothing, so the connector need not own this resolver.
        self._resolver = resolver or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        resolved = await self._resolver.resolve(host, port, family)
        kept = [result for result in resolved if _may_connect(result["host"], self._allowed)]
        if not kept:
            log.info(
                "webhook host %s refused: it resolves to %s",
                host,
                ", ".join(result["host"] for result in resolved),
            )
            raise AddressRefused(host)
        return kept

    async def close(self) -> None:
        await self._resolver.close()


def webhook_session(allowed: Iterable[Network], timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A client session that opens connections only to the addresses `may_post_to` allows."""
    networks = tuple(allowed)

    async def refuse_an_address_url(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        host = params.url.raw_host or ""
        if _is_address(host) and not _may_connect(host, networks):
            raise AddressRefused(host)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(refuse_an_address_url)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=PublicResolver(networks)),
        timeout=timeout,
        trace_configs=[trace],
    )


__all__ = ["AddressRefused", "Network", "PublicResolver", "may_post_to", "webhook_session"]
