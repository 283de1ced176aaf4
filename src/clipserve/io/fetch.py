"""Fetching images over http(s) for untrusted callers without becoming an SSRF proxy.

A URL from a client is fetched only when the operator enabled fetching, only from allow-listed hosts, and
only from public addresses. The checks, in order, for the URL and again for every redirect target:

1. scheme http or https, a host, no credentials in the URL;
2. the host matches the allow-list (``"example.com"`` exactly, ``"*.example.com"`` for any subdomain,
   ``"*"`` for any host);
3. the host is resolved once, and *every* resolved address must be public: loopback, private (RFC 1918,
   ULA), link-local (cloud metadata at 169.254.169.254), multicast, reserved, unspecified, shared (CGNAT)
   and IPv4-mapped/NAT64 forms of those are refused;
4. the connection goes to the address that was checked (the URL is rewritten to the IP; the Host header
   and the TLS server name stay the original host, so certificates are still verified against it). There
   is no second DNS lookup, hence no DNS-rebinding window between the check and the connect.

Redirects are followed by hand (at most ``max_redirects``) so that each target passes the same checks. The
body is streamed with a byte cap and the whole fetch runs under one deadline. Proxy environment variables
are ignored (``trust_env=False``): a proxy would connect to hosts this module never checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(ValueError):
    """A URL that was refused or could not be fetched; one line meant for the client."""


@dataclass(frozen=True)
class FetchPolicy:
    """What the server may fetch. Disabled unless the operator turns it on.

    ``allow_loopback`` exists for tests only (a local ``http.server`` on 127.0.0.1): it permits loopback
    addresses, nothing else that is private. The command line does not expose it.
    """

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = 10.0
    max_bytes: int = 16 * 2**20
    max_redirects: int = 3
    allow_loopback: bool = False

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"fetch timeout must be positive, got {self.timeout_s}")
        if self.max_bytes <= 0:
            raise ValueError(f"fetch byte cap must be positive, got {self.max_bytes}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        if self.enabled and not self.allowed_hosts:
            raise ValueError("URL fetching is enabled without a host allow-list (name hosts, or '*' for any)")
        for pattern in self.allowed_hosts:
            if not pattern or (pattern != "*" and "*" in pattern.removeprefix("*.")):
                raise ValueError(f"bad host pattern {pattern!r}: use 'host', '*.domain' or '*'")

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            pattern = pattern.lower().rstrip(".")
            if pattern == "*" or host == pattern:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False


def address_refusal(ip: IPAddress, allow_loopback: bool = False) -> str | None:
    """Why ``ip`` must not be connected to, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded, allow_loopback)
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    for kind, flag in (
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return kind
    if not ip.is_global:  # e.g. 100.64.0.0/10 (shared address space)
        return "non-public"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for ``host`` (IPv4 and IPv6)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve host {host!r}: {exc.strerror or exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class CheckedTarget:
    """A URL that passed every check, with the address to connect to."""

    url: str
    host: str
    ip: str
    connect_url: str


async def check_url(url: str, policy: FetchPolicy, resolver: Resolver = system_resolver) -> CheckedTarget:
    """Run checks 1-3 of the module doc on ``url``; FetchError says which one failed."""
    if not policy.enabled:
        raise FetchError("fetching image URLs is disabled on this server; send the image as a data URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise FetchError(f"only http and https URLs can be fetched, not {scheme or 'a relative URL'!r}")
    host = parts.hostname
    if not host:
        raise FetchError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise FetchError("URLs with credentials are refused")
    if not policy.host_allowed(host):
        raise FetchError(f"host {host!r} is not in this server's URL allow-list")
    port = port or _DEFAULT_PORTS[scheme]
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await resolver(host, port)]
    if not addresses:
        raise FetchError(f"host {host!r} resolves to no address")
    for ip in addresses:
        why = address_refusal(ip, policy.allow_loopback)
        if why is not None:
            raise FetchError(f"host {host!r} resolves to a {why} address ({ip}); refused")
    ip = str(addresses[0])
    netloc_ip = f"[{ip}]" if ":" in ip else ip
    connect_url = urlunsplit((scheme, f"{netloc_ip}:{port}", parts.path or "/", parts.query, ""))
    return CheckedTarget(url=url, host=host, ip=ip, connect_url=connect_url)


async def fetch_url(
    url: str,
    policy: FetchPolicy,
    *,
    resolver: Resolver = system_resolver,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The body of ``url`` after the checks in the module doc; FetchError for every refusal or failure."""
    deadline = time.monotonic() + policy.timeout_s
    timeout = httpx.Timeout(policy.timeout_s)
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False, transport=transport
    ) as client:
        current = url
        for _ in range(policy.max_redirects + 1):
            target = await check_url(current, policy, resolver)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError(f"fetching {url} timed out after {policy.timeout_s:g}s")
            try:
                body, location = await asyncio.wait_for(_get(client, target, policy.max_bytes), remaining)
            except asyncio.TimeoutError:
                raise FetchError(f"fetching {url} timed out after {policy.timeout_s:g}s") from None
            if location is None:
                return body
            current = urljoin(current, location)
        raise FetchError(f"too many redirects (more than {policy.max_redirects}) fetching {url}")


async def _get(client: httpx.AsyncClient, target: CheckedTarget, max_bytes: int) -> tuple[bytes, str | None]:
    """(body, None), or (b"", Location) for a redirect."""
    port = urlsplit(target.url).port
    host_part = f"[{target.host}]" if ":" in target.host else target.host
    host_header = host_part if port is None else f"{host_part}:{port}"
    request = client.build_request(
        "GET",
        target.connect_url,
        headers={"Host": host_header, "Accept": "image/*"},
        extensions={"sni_hostname": target.host},
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException:
        raise FetchError(f"fetching {target.url} timed out") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"cannot fetch {target.url}: {type(exc).__name__}: {exc}") from None
    try:
        if response.status_code in _REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise FetchError(f"{target.url} redirects without a Location")
            return b"", location
        if response.status_code != 200:
            raise FetchError(f"{target.url} answered HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(f"{target.url} is too large: {declared} bytes > limit {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():  # decoded bytes: the cap bounds what we keep
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{target.url} is too large: more than {max_bytes} bytes")
                chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise FetchError(f"cannot fetch {target.url}: {type(exc).__name__}: {exc}") from None
        return b"".join(chunks), None
    finally:
        await response.aclose()


__all__ = ["CheckedTarget", "FetchError", "FetchPolicy", "address_refusal", "check_url", "fetch_url"]
