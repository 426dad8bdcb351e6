"""SSRF guard for the page fetcher.

Search results point at arbitrary URLs, so before contacting a server the fetcher asks
:class:`Guard` to vet the URL: http(s) only, no credentials, and every address the host resolves
to must be a public one. The fetcher then connects to the address that was vetted (not to the
name, which a rebinding DNS server could answer differently the second time), and vets again
after every redirect.

"Public" is decided by this module's own tables of the IANA special-purpose address registries
(IPv4 and IPv6, plus multicast; IPv6 outside global unicast ``2000::/3`` too), not by
``ipaddress``' ``is_global``/``is_private``, whose answers differ between Python releases (3.11.7
calls ``192.0.0.8`` global, for one). Every registered block is refused, also the few the registry
marks globally reachable (PCP/TURN/DNS-SD anycast, AMT, AS112, ORCHIDv2, drone remote ID inside
``192.0.0.0/24`` and ``2001::/23``; AS112 and AMT blocks of their own): they are network services,
never web pages.

Hosts are parsed the way browsers and ``inet_aton`` do, so odd spellings of an address
(``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]``) are recognised as the
address they mean. IPv6 addresses that carry an IPv4 address (IPv4-mapped, IPv4-compatible,
6to4, Teredo, NAT64) are judged by the IPv4 address as well; the mapped, NAT64 (``64:ff9b::/96``)
and 6to4 ones by it alone, since they reach that IPv4 host.

Private targets, and any special-purpose block, are reachable only through an explicit allow-list
of host names or CIDR ranges.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Awaitable[list[str]]]
"""Maps a host name to the IP addresses it resolves to (as strings)."""


class FetchError(Exception):
    """A page could not be fetched; ``str(error)`` starts with a short reason such as ``blocked``."""

    reason = "error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)
        self.detail = detail


class Blocked(FetchError):
    """The URL or the address it leads to is not one the fetcher may contact."""

    reason = "blocked"


class ResolveError(FetchError):
    reason = "dns"


# Instance-metadata endpoints of cloud providers: the prize of most SSRF attacks. They are
# refused even for allow-listed host names; only an address or CIDR entry can open one.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",
    )
)


def _table(*rows: tuple[str, str]) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]:
    return tuple((ipaddress.ip_network(cidr), label) for cidr, label in rows)


# IANA IPv4 Special-Purpose Address Registry, and multicast (RFC 5771).
SPECIAL_PURPOSE_V4 = _table(
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", "AS112"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # 255.255.255.255/32, limited broadcast, is in it
)
# IANA IPv6 Special-Purpose Address Registry, multicast and the deprecated site-local block.
# ::ffff:0:0/96, 64:ff9b::/96 and 2002::/16 are not here: they carry an IPv4 address and are judged
# by it alone (_TRANSLATIONS). The local-use NAT64 prefix is refused: its translator is the
# operator's own network, and where it puts the IPv4 address is the operator's choice too.
SPECIAL_PURPOSE_V6 = _table(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy prefix"),
    ("2001::/23", "IETF protocol assignments"),  # Teredo 2001::/32 among them
    ("2001:db8::/32", "documentation"),
    ("2620:4f:8000::/48", "AS112"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6) SIDs"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")  # all IPv6 unicast the IANA has allocated for the internet
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_TRANSLATIONS = (ipaddress.ip_network("::ffff:0:0/96"), _NAT64, ipaddress.ip_network("2002::/16"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_HEX = re.compile(r"0x[0-9a-f]*", re.IGNORECASE)
_OCTAL = re.compile(r"0[0-7]+")
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address in any spelling ``inet_aton`` accepts: 1 to 4 parts, each decimal, octal
    (leading 0) or hex (0x), the last part filling the remaining bytes. ``None`` if not one."""
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()  # a trailing dot is allowed, as in a fully qualified name
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if _HEX.fullmatch(part):
            values.append(int(part[2:] or "0", 16))
        elif _OCTAL.fullmatch(part):
            values.append(int(part, 8))
        elif part.isascii() and part.isdigit() and (part == "0" or not part.startswith("0")):
            values.append(int(part, 10))
        else:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def parse_ip(host: str) -> IPAddress | None:
    """The address a URL host names literally (brackets and IPv6 zone ids allowed), else ``None``."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        host = host.replace("%25", "%").split("%", 1)[0]
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return parse_ipv4(host)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client; the server part is a public relay
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or ip in _IPV4_TRANSLATED:
        return low32
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # ::/96 minus :: and ::1, judged on their own
        return low32
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why an address must not be contacted, or ``None`` for a public unicast address."""
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    inner = embedded_ipv4(ip)
    if inner is not None:
        if why := forbidden_reason(inner):
            return f"{ip} embeds {inner}: {why}"
        if any(ip in net for net in _TRANSLATIONS):
            return None  # a translation of a public IPv4 address (e.g. DNS64 on IPv6-only hosts)
    table = SPECIAL_PURPOSE_V4 if isinstance(ip, ipaddress.IPv4Address) else SPECIAL_PURPOSE_V6
    for network, label in table:
        if ip in network:
            return f"{ip} is not a public address ({label}, {network})"
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST:
        return f"{ip} is not a public address (outside global unicast {_GLOBAL_UNICAST})"
    return None


async def system_resolver(host: str) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True, slots=True)
class Target:
    """A vetted URL: where to connect (``ip``) and the name the server must see (``host``)."""

    url: SplitResult
    host: str
    ip: str


class AllowList:
    """Host names and CIDR ranges (or single addresses) whose private addresses may be contacted."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            entry = entry.strip().lower()
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.hosts.add(entry.rstrip("."))

    def covers_address(self, ip: IPAddress) -> bool:
        inner = embedded_ipv4(ip)
        return any(a in net for net in self.networks for a in (ip, inner) if a is not None and a.version == net.version)

    def covers_host(self, host: str) -> bool:
        return host.rstrip(".") in self.hosts


class Guard:
    def __init__(self, allow: Iterable[str] = (), resolver: Resolver | None = None) -> None:
        self.allow = AllowList(allow)
        self.resolver = resolver or system_resolver

    @staticmethod
    def check_url(url: str) -> tuple[SplitResult, str]:
        """The parts of a URL the fetcher may request at all, and its lower-case host."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on an out-of-range port
        except ValueError as exc:
            raise Blocked(f"malformed URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise Blocked(f"scheme {parts.scheme or '(none)'!r} is not http(s)")
        if "@" in parts.netloc:
            raise Blocked("URLs with credentials are refused")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise Blocked(f"no host in {url!r}")
        return parts, host

    def check_address(self, ip: IPAddress, host: str) -> None:
        why = forbidden_reason(ip)
        if why is None or self.allow.covers_address(ip):
            return
        if self.allow.covers_host(host) and ip not in METADATA_ADDRESSES:
            return
        raise Blocked(f"{host}: {why}" if host != str(ip) else why)

    def check_literal(self, url: str) -> tuple[SplitResult, str]:
        """Checks that need no DNS: scheme, credentials, literal addresses and local names. Used
        alone for URLs that route_map sends elsewhere (their own host is never contacted)."""
        parts, host = self.check_url(url)
        ip = parse_ip(host)
        if ip is not None:
            self.check_address(ip, host)
        elif (host in _LOCAL_NAMES or host.endswith(".localhost")) and not self.allow.covers_host(host):
            raise Blocked(f"{host} is a local name")
        return parts, host

    async def vet(self, url: str) -> Target:
        """Checks a URL fully and picks the address to connect to; raises :class:`Blocked`."""
        parts, host = self.check_literal(url)
        ip = parse_ip(host)
        if ip is not None:
            return Target(parts, host, str(ip))
        try:
            answers = await self.resolver(host)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"{host}: {exc}") from None
        addresses: list[IPAddress] = []
        for answer in answers:
            try:
                addresses.append(ipaddress.ip_address(answer.split("%", 1)[0]))
            except ValueError:
                raise ResolveError(f"{host}: resolver returned {answer!r}") from None
        if not addresses:
            raise ResolveError(f"{host}: no addresses")
        # Every answer is checked: a name with one public and one private address is refused,
        # since connecting to "the public one" is only safe if we never fall back to the other.
        for address in addresses:
            self.check_address(address, host)
        return Target(parts, host, str(addresses[0]))
