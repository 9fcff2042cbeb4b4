"""The client address the per-address limits count by."""

from __future__ import annotations

import ipaddress

from flask import request

# One IPv6 subscriber usually holds a whole /64 and can pick any address in it.
IPV6_PREFIX = 64


def rate_limit_key() -> str:
    """REMOTE_ADDR (the address nginx saw), with an IPv6 client counted by its /64 and an
    IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, a dual-stack socket) as the IPv4 one."""
    raw = request.remote_addr or ""
    try:
        address = ipaddress.ip_address(raw.split("%", 1)[0])  # without an IPv6 zone index
    except ValueError:
        return raw  # a unix socket peer or a test client's placeholder: counted as given
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)
