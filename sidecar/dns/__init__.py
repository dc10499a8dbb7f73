"""DNS for the agents' zone: pure resolver, wire-bytes cache, forwarder, UDP/TCP shell.

Only this package imports dnslib; it never imports ``sidecar.proxy``.
"""

from .server import DnsServer

__all__ = ["DnsServer"]
