"""Peer addresses as the listener compares them.

A peer's address arrives from its socket; a destination's or an allowed network's
comes from the configuration. They are compared as :mod:`ipaddress` objects, so that
the forms one address can take (an IPv4 peer of a listener bound to ``::``, a
link-local IPv6 address with its scope) compare equal.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_address(text: str) -> IPAddress | None:
    """Parse an address as the peer's socket gives it, for comparison.

    An IPv4 peer of a listener bound to ``::`` arrives as ``::ffff:a.b.c.d``, and a
    link-local IPv6 one may carry a ``%scope``: both compare as the plain address.

    Parameters
    ----------
    text : str
        An IPv4 or IPv6 address.

    Returns
    -------
    IPv4Address or IPv6Address or None
        None when it is not an address (a host name).
    """
    try:
        ip = ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
