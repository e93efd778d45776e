"""Replicas discovered from DNS: ``dns+http://name:port`` stands for every address ``name``
resolves to, e.g. a headless Kubernetes Service whose A records are the ready pods.

Resolution goes through the event loop's resolver (a thread pool, never blocking the loop). A
failed lookup keeps the previous replicas: a DNS blip must not empty a pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

DNS_PREFIX = "dns+"


def is_dns(url: str) -> bool:
    return url.startswith(DNS_PREFIX)


async def resolve(url: str) -> list[str]:
    """The replica URLs behind ``dns+http(s)://name[:port][/path]``, sorted; raises OSError."""
    parts = urlsplit(url.removeprefix(DNS_PREFIX))
    host = parts.hostname
    if host is None:
        raise OSError(f"no host in {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    urls = set()
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if ipaddress.ip_address(address).version == 6:
            address = f"[{address}]"
        urls.add(f"{parts.scheme}://{address}:{port}{parts.path.rstrip('/')}")
    return sorted(urls)
