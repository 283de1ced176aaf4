"""SSRF-safe URL fetching. Refusals are checked before any connection; the only traffic is to a local
http.server on 127.0.0.1, permitted through the test-only `allow_loopback` override."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipserve.io.fetch import FetchError, FetchPolicy, address_refusal, check_url, fetch_url

BODY = b"\x89PNG fake image bytes" * 10


def run(coro):
    return asyncio.run(coro)


def resolver(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


@pytest.mark.parametrize(
    ("ip", "why"),
    [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
        ("172.16.5.5", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("100.64.0.1", None), ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::a00:1", "private"), ("240.0.0.1", None),
    ],
)
def test_non_public_addresses_are_refused(ip: str, why: str | None) -> None:
    refusal = address_refusal(ipaddress.ip_address(ip))
    assert refusal is not None
    if why is not None:
        assert refusal == why


def test_public_addresses_pass() -> None:
    for ip in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert address_refusal(ipaddress.ip_address(ip)) is None


ANY = FetchPolicy(enabled=True, allowed_hosts=("*",))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://localhost/x.png", "loopback"),  # resolved by the system resolver, no traffic
        ("http://[::1]:8080/x.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.7/x.png", "private"),
        ("http://2130706433/x.png", "loopback"),  # 127.0.0.1 as a decimal integer
        ("ftp://example.com/x.png", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:pw@example.com/x.png", "credentials"),
        ("http:///x.png", "no host"),
    ],
)
def test_refused_urls(url: str, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        run(check_url(url, ANY))


def test_disabled_by_default() -> None:
    with pytest.raises(FetchError, match="disabled"):
        run(check_url("https://example.com/cat.png", FetchPolicy()))


def test_allow_list() -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=("images.example.com", "*.cdn.example.org"))
    assert policy.host_allowed("images.example.com") and policy.host_allowed("a.b.cdn.example.org")
    assert not policy.host_allowed("example.com") and not policy.host_allowed("evilcdn.example.org")
    with pytest.raises(FetchError, match="allow-list"):
        run(check_url("https://other.example.com/x.png", policy))
    with pytest.raises(ValueError, match="allow-list"):
        FetchPolicy(enabled=True)


def test_allow_listed_host_resolving_to_private_address_is_refused() -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=("images.example.com",))
    fake = resolver({"images.example.com": ["93.184.216.34", "10.0.0.5"]})  # one bad address is enough
    with pytest.raises(FetchError, match="private"):
        run(check_url("https://images.example.com/x.png", policy, fake))
    checked = run(check_url("https://images.example.com/x.png?a=1", policy, resolver({"images.example.com":
                                                                                       ["93.184.216.34"]})))
    assert checked.connect_url == "https://93.184.216.34:443/x.png?a=1"  # connect to the checked address


def test_loopback_override_is_loopback_only() -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=("*",), allow_loopback=True)
    run(check_url("http://127.0.0.1:1/x.png", policy))
    with pytest.raises(FetchError, match="private"):
        run(check_url("http://10.0.0.1/x.png", policy))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's API)
        routes = {
            "/image.png": (200, {"Content-Type": "image/png"}, BODY),
            "/big.png": (200, {"Content-Type": "image/png"}, b"x" * 5000),
            "/to-private": (302, {"Location": "http://10.0.0.1/secret.png"}, b""),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/"}, b""),
            "/to-image": (302, {"Location": "/image.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b"nope"),
        }
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


LOCAL = FetchPolicy(enabled=True, allowed_hosts=("127.0.0.1",), allow_loopback=True, max_bytes=1000, timeout_s=5)


def test_fetch_from_local_server(local_server: str) -> None:
    assert run(fetch_url(f"{local_server}/image.png", LOCAL)) == BODY
    assert run(fetch_url(f"{local_server}/to-image", LOCAL)) == BODY  # a redirect, re-checked


def test_without_override_the_local_server_is_refused(local_server: str) -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=("127.0.0.1",))
    with pytest.raises(FetchError, match="loopback"):
        run(fetch_url(f"{local_server}/image.png", policy))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/to-private", "private"),
        ("/to-metadata", "link-local"),
        ("/loop", "too many redirects"),
        ("/big.png", "too large"),
        ("/missing", "HTTP 404"),
    ],
)
def test_fetch_refusals(local_server: str, path: str, message: str) -> None:
    any_host = replace(LOCAL, allowed_hosts=("*",))  # so redirect targets reach the address check
    with pytest.raises(FetchError, match=message):
        run(fetch_url(f"{local_server}{path}", any_host))


def test_redirect_target_must_be_allow_listed(local_server: str) -> None:
    with pytest.raises(FetchError, match="'10.0.0.1' is not in this server's URL allow-list"):
        run(fetch_url(f"{local_server}/to-private", LOCAL))


def test_host_outside_the_allow_list_is_refused_even_on_loopback(local_server: str) -> None:
    port = local_server.rsplit(":", 1)[1]
    with pytest.raises(FetchError, match="allow-list"):
        run(fetch_url(f"http://localhost:{port}/image.png", LOCAL))
