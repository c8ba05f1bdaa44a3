"""Where a customer's model endpoint may point: not into the platform's own network.

An ``ollama`` agent names its own ``base_url``, and its process sends requests there from inside the cluster.
Pointed at loopback, a link-local metadata service or a private address, it would reach what only the platform
should (Nomad's and Consul's APIs, the gateway, a cloud's instance metadata): server-side request forgery. Such
hosts are refused unless an operator allows them (``CARAVAN_MODEL_URL_ALLOW``: host names and networks,
comma-separated, e.g. ``ollama.internal,10.20.0.0/16``).

Twice: the control plane refuses an agent definition whose host is an internal address as written (``127.1``
and ``2130706433`` are loopback too) or a ``localhost`` name, without looking anything up; and the agent's HTTP
client checks every address it connects to after resolving the name itself, connecting to the address it
checked (a name that resolves elsewhere later, or to an internal address from the start, is refused when it is
used). TLS still verifies the name in the URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
import httpx

from agent.protocol import ascii_host

__all__ = [
    "ALLOW_ENV",
    "EgressPolicy",
    "EgressRefused",
    "GuardedTransport",
    "endpoint_failure",
    "error_text",
    "failure_text",
    "refusal_in",
]

log = logging.getLogger("caravan.egress")

ALLOW_ENV = "CARAVAN_MODEL_URL_ALLOW"
_IPV4_LOOSE = re.compile(r"[0-9a-fx.]+")  # what inet_aton reads as an address: 127.1, 0x7f.1, 2130706433

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressRefused(ValueError):
    """A model endpoint in the platform's own network, not allowed by the operator."""


def _literal_address(host: str) -> IPAddress | None:
    """The address ``host`` names without a lookup (as a resolver reads it), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _IPV4_LOOSE.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""NAT64's well-known prefix: a gateway forwards ``64:ff9b::a.b.c.d`` to a.b.c.d (RFC 6052)."""
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
"""NAT64 prefixes for a network's own use (RFC 8215): which IPv4 address one carries depends on its gateway."""
_COMPATIBLE = ipaddress.IPv6Network("::/96")
"""IPv4-compatible addresses (``::a.b.c.d``, deprecated, still routed to a.b.c.d by some stacks)."""


def _unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries and may reach: IPv4-mapped (``::ffff:127.0.0.1`` is 127.0.0.1),
    IPv4-compatible (``::127.0.0.1``), NAT64's (``64:ff9b::a9fe:a9fe``, 169.254.169.254 through a NAT64 gateway)
    and 6to4 (``2002:a9fe:a9fe::``); else itself."""
    if not isinstance(address, ipaddress.IPv6Address):
        return address
    carried = address.ipv4_mapped or address.sixtofour
    if carried is not None:
        return carried
    if address in _NAT64 or (address in _COMPATIBLE and int(address) > 1):  # (:: and ::1 are themselves)
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return address


@dataclass(frozen=True)
class EgressPolicy:
    """Which internal hosts an operator allows model endpoints at (every public one is allowed)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> EgressPolicy:
        """``host,host,network/prefix,...``; :class:`ValueError` for an entry that is neither."""
        hosts, networks = set(), []
        for entry in filter(None, (part.strip().lower().rstrip(".") for part in text.split(","))):
            if "/" in entry or _literal_address(entry) is not None:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError as exc:
                    raise ValueError(f"{ALLOW_ENV}: {entry!r} is not a network: {exc}") from None
            elif re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", entry):
                hosts.add(entry)
            else:
                raise ValueError(f"{ALLOW_ENV}: {entry!r} is neither a host name nor a network")
        return cls(frozenset(hosts), tuple(networks))

    @classmethod
    def from_env(cls) -> EgressPolicy:
        return cls.parse(os.environ.get(ALLOW_ENV, ""))

    def _allows(self, address: IPAddress) -> bool:
        carried = _unmapped(address)
        if any(address in network or carried in network for network in self.networks):
            return True
        # (Python calls some reserved ranges global: NAT64's and IPv4-compatible addresses among them)
        return carried.is_global and not carried.is_reserved and address not in _NAT64_LOCAL

    def check_url(self, url: str) -> None:
        """Refuse a URL whose host is, as written, an internal address or a ``localhost`` name (no lookup)."""
        written = urlsplit(url).hostname or ""
        try:
            host = ascii_host(written).rstrip(".")  # (127。0。0。1 is 127.0.0.1)
        except ValueError as exc:
            raise EgressRefused(f"{written!r} cannot be looked up: {exc}") from None
        if host in self.hosts:
            return
        if host == "localhost" or host.endswith(".localhost"):
            raise EgressRefused(f"{host} is this machine: {_ADVICE}")
        address = _literal_address(host)
        if address is not None and not self._allows(address):
            raise EgressRefused(f"{host} is an internal address ({_kind(address)}): {_ADVICE}")

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``, in the resolver's order: every address it resolves to is
        checked (a name that also resolves to an internal address is refused, whichever one a connection would
        have taken)."""
        if host.lower().rstrip(".") in self.hosts:
            return [host]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        for address in addresses:
            if not self._allows(address):
                raise EgressRefused(f"{host} resolves to {address}, an internal address ({_kind(address)}): {_ADVICE}")
        return list(dict.fromkeys(str(address) for address in addresses))


_ADVICE = (
    "a model endpoint must not point into the platform's network "
    f"(an operator may allow an internal one with {ALLOW_ENV})"
)


def _kind(address: IPAddress) -> str:
    if address in _NAT64_LOCAL:
        return "local-use NAT64"
    address = _unmapped(address)
    for kind in ("loopback", "link_local", "private", "unspecified", "multicast", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "not public"


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host itself, checks the addresses and connects to the one it checked."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):  # the lookup is part of the connection's time
                addresses = await self._policy.resolve(host, port)
        except EgressRefused as refused:
            log.warning("refused to connect to a model endpoint: %s", refused)
            raise
        except TimeoutError as exc:  # as httpcore's own backend reports a lookup that fails, so that the client
            raise httpcore.ConnectTimeout(f"looking up {host} timed out") from exc  # says which request it was
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot look up {host}: {exc}") from exc
        for address in addresses[:-1]:  # each checked address in turn (an IPv6 one may be unreachable), as a
            try:  # connection to the name would
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return await self._inner.connect_tcp(addresses[-1], port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise EgressRefused("a model endpoint is not reached over a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, its connections made by :class:`_GuardedBackend`. No proxy from the environment: a
    proxy would make the connections the backend cannot see."""

    def __init__(self, policy: EgressPolicy) -> None:
        context = httpx.create_ssl_context(trust_env=False)  # (one, for both pools: loading the CAs is the cost)
        super().__init__(verify=context, trust_env=False, limits=_LIMITS)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=_LIMITS.max_connections,
            max_keepalive_connections=_LIMITS.max_keepalive_connections,
            keepalive_expiry=_LIMITS.keepalive_expiry,
            network_backend=_GuardedBackend(policy),
        )


_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's defaults


def refusal_in(exc: BaseException) -> EgressRefused | None:
    """The refusal behind ``exc`` (a model client wraps its transport's errors in its own), if there is one."""
    return next((each for each in _chain(exc) if isinstance(each, EgressRefused)), None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or while handling, in turn (a model client wraps its transport's errors
    in its own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _request_of(exc: BaseException) -> httpx.Request | None:
    try:  # httpx's errors raise for a request they were not given; the SDKs' errors carry theirs as an attribute
        request = getattr(exc, "request", None)
    except RuntimeError:
        return None
    return request if isinstance(request, httpx.Request) else None


def endpoint_failure(exc: BaseException) -> str | None:
    """What a failed call to a model endpoint says of itself, naming the endpoint (an SDK says only "Connection
    error." of one it cannot reach), but never its URL's query or credentials; None for any other exception."""
    refused = refusal_in(exc)
    if refused is not None:
        return f"model endpoint refused: {refused}"
    chain = list(_chain(exc))
    request = next(filter(None, map(_request_of, chain)), None)
    if request is None:
        return None
    url = request.url
    where = f"{request.method} {url.scheme}://{url.netloc.decode('ascii')}{url.path}"
    transport = next((each for each in chain if isinstance(each, httpx.TransportError)), None)
    if transport is not None:
        return f"cannot reach the model endpoint ({where}): {str(transport) or type(transport).__name__}"
    return f"the model endpoint ({where}) answered: {exc}"


FAILURE_TEXT_MAX = 1000
"""At most this many characters of a failure are said (a task's status reason, its error event)."""


def failure_text(exc: BaseException) -> str:
    """What a task that ``exc`` ended says of it: at most :data:`FAILURE_TEXT_MAX` characters (an endpoint can
    answer a whole page), and none of the traceback an error's text may carry (AgentChat's errors of a member)."""
    said = endpoint_failure(exc)
    if said is None:
        text = error_text(exc)
        said = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return said[:FAILURE_TEXT_MAX]


def error_text(exc: BaseException) -> str:
    """``exc``'s own text up to the traceback it may carry, at most :data:`FAILURE_TEXT_MAX` characters; may be
    empty."""
    return str(exc).strip().split("\nTraceback", 1)[0].strip()[:FAILURE_TEXT_MAX]
