"""The SSRF guard on its own: URL checks, address classes, odd spellings, DNS answers, allow-list."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrieval.ssrf import Blocked, Guard, ResolveError, forbidden_reason, parse_ip, parse_ipv4


def no_dns(calls: list[str] | None = None):
    async def resolver(host: str) -> list[str]:
        if calls is not None:
            calls.append(host)
        raise AssertionError(f"resolver called for {host}")

    return resolver


def dns(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolver(host: str) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]

    return resolver


BLOCKED_LITERALS = [
    "http://127.0.0.1/",
    "http://127.0.0.1:8080/admin",
    "http://2130706433/",  # decimal
    "http://0x7f.1/",  # hex, short form
    "http://0x7f000001/",
    "http://0177.0.0.1/",  # octal
    "http://127.1/",
    "http://127.0.0.1./",
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://[2002:7f00:1::1]/",  # 6to4 around 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 around 169.254.169.254
    "http://[64:ff9b::a00:1]/",  # NAT64 around 10.0.0.1
    "http://[::ffff:0:a00:1]/",  # IPv4-translated 10.0.0.1
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.100.100.200/",
    "http://169.254.1.1/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # shared address space
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://192.0.2.1/",
    "http://[fc00::1]/",
    "http://[fec0::1]/",
    "http://localhost/",
    "http://LOCALHOST./",
    "http://api.localhost/",
]


@pytest.mark.parametrize("url", BLOCKED_LITERALS)
async def test_literal_private_targets_are_blocked_without_dns(url: str) -> None:
    calls: list[str] = []
    with pytest.raises(Blocked):
        await Guard(resolver=no_dns(calls)).vet(url)
    assert calls == []


# The IANA special-purpose registries (IPv4, IPv6) and multicast: each block refused at both ends, with
# the Python release's own ipaddress answers left out of it (3.11.7 calls 192.0.0.8 global, for one).
SPECIAL_PURPOSE_BLOCKS = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.31.196.0/24",
    "192.52.193.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "192.175.48.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "64:ff9b:1::/48",
    "100::/64",
    "100:0:0:1::/64",
    "2001::/23",
    "2001:db8::/32",
    "2620:4f:8000::/48",
    "3fff::/20",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
]
# Blocks that carry an IPv4 address are judged by it: refused around a special-purpose one.
CARRIED_SPECIAL_PURPOSE = [
    "::ffff:192.0.0.8",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "64:ff9b::c000:8",  # NAT64 well-known prefix, around 192.0.0.8
    "64:ff9b::c0a8:101",  # around 192.168.1.1
    "2002:c000:8::1",  # 6to4 around 192.0.0.8
    "2002:c633:6401::1",  # around 198.51.100.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
]
PUBLIC_ADDRESSES = [
    "93.184.216.34",
    "8.8.8.8",
    "1.1.1.1",
    "192.0.1.1",  # next to the special-purpose 192.0.0.0/24 and 192.0.2.0/24
    "100.63.255.255",  # the edges of 100.64.0.0/10
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "198.17.255.255",
    "198.20.0.0",
    "223.255.255.255",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "2001:200::1",  # just past 2001::/23
    "2a00:1450:4001:80b::200e",
    "::ffff:93.184.216.34",
    "64:ff9b::5db8:d822",
    "2002:5db8:d822::1",
]


def block_ends(block: str) -> list[str]:
    net = ipaddress.ip_network(block)
    return list(dict.fromkeys([str(net.network_address), str(net.broadcast_address)]))


def url_for(address: str) -> str:
    return f"http://[{address}]/" if ":" in address else f"http://{address}/"


@pytest.mark.parametrize(
    "address",
    [a for block in SPECIAL_PURPOSE_BLOCKS for a in block_ends(block)] + CARRIED_SPECIAL_PURPOSE,
)
async def test_special_purpose_addresses_are_refused(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None
    with pytest.raises(Blocked, match=re.escape(str(ipaddress.ip_address(address)))):
        await Guard(resolver=no_dns()).vet(url_for(address))
    with pytest.raises(Blocked, match="rebind.example"):
        await Guard(resolver=dns({"rebind.example": [address]})).vet("https://rebind.example/")


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
async def test_ordinary_global_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None
    target = await Guard(resolver=dns({"example.com": [address]})).vet("https://example.com/")
    assert ipaddress.ip_address(target.ip) == ipaddress.ip_address(address)


def test_the_tables_decide_not_this_pythons_ipaddress(monkeypatch) -> None:
    """With every ``ipaddress`` classification saying "global", the special-purpose blocks are still refused."""
    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        monkeypatch.setattr(cls, "is_global", property(lambda self: True))
        for name in ("is_private", "is_reserved", "is_loopback", "is_link_local", "is_multicast", "is_unspecified"):
            monkeypatch.setattr(cls, name, property(lambda self: False))
    monkeypatch.setattr(ipaddress.IPv6Address, "is_site_local", property(lambda self: False))
    for address in ("192.0.0.8", "192.31.196.1", "224.0.0.1", "127.0.0.1", "2001:1::1", "3fff::1", "fec0::1", "::1"):
        assert forbidden_reason(ipaddress.ip_address(address)) is not None, address
    assert forbidden_reason(ipaddress.ip_address("93.184.216.34")) is None


async def test_allow_list_opens_special_purpose_blocks_it_names() -> None:
    guard = Guard(["192.0.0.0/24", "2001:db8::/32", "64:ff9b:1::/48"], resolver=dns({"lab.example": ["192.0.0.8"]}))
    assert (await guard.vet("http://192.0.0.8/")).ip == "192.0.0.8"
    assert (await guard.vet("http://lab.example/")).ip == "192.0.0.8"
    assert (await guard.vet("http://[2001:db8::1]/")).ip == "2001:db8::1"
    assert (await guard.vet("http://[64:ff9b:1::a00:1]/")).ip == "64:ff9b:1::a00:1"
    for url in ("http://192.0.2.1/", "http://[2001:1::1]/", "http://[3fff::1]/"):
        with pytest.raises(Blocked):
            await guard.vet(url)


@pytest.mark.parametrize(
    ("url", "ip"),
    [
        ("http://8.8.8.8/", "8.8.8.8"),
        ("https://134744072/", "8.8.8.8"),
        ("http://[2606:4700:4700::1111]/", "2606:4700:4700::1111"),
        ("http://[::ffff:8.8.8.8]/", "::ffff:808:808"),
        ("http://[64:ff9b::808:808]/", "64:ff9b::808:808"),
    ],
)
async def test_public_literals_pass_and_are_the_connect_address(url: str, ip: str) -> None:
    target = await Guard(resolver=no_dns()).vet(url)
    assert target.ip == ip


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/file",
        "gopher://example.com/",
        "javascript:alert(1)",
        "data:text/html,hello",
        "//example.com/no-scheme",
        "http://user:secret@example.com/",
        "http://user@example.com/",
        "http:///no-host",
        "http://example.com:99999/",
    ],
)
async def test_bad_schemes_credentials_and_malformed_urls_are_blocked(url: str) -> None:
    with pytest.raises(Blocked):
        await Guard(resolver=dns({"example.com": ["93.184.216.34"]})).vet(url)


@pytest.mark.parametrize(
    "answers",
    [
        ["10.0.0.5"],
        ["127.0.0.1"],
        ["::1"],
        ["169.254.169.254"],
        ["::ffff:169.254.169.254"],
        ["93.184.216.34", "192.168.0.9"],
    ],
)
async def test_names_resolving_to_private_addresses_are_blocked(answers: list[str]) -> None:
    guard = Guard(resolver=dns({"rebind.example": answers}))
    with pytest.raises(Blocked, match="rebind.example"):
        await guard.vet("https://rebind.example/path")


async def test_public_name_is_vetted_and_pinned_to_the_resolved_address() -> None:
    calls: list[str] = []
    target = await Guard(resolver=dns({"example.com": ["93.184.216.34", "2606:2800:220:1::1"]}, calls)).vet(
        "https://Example.COM/a?b=1"
    )
    assert (target.host, target.ip) == ("example.com", "93.184.216.34")
    assert calls == ["example.com"]


async def test_resolution_failure_is_a_fetch_error_not_a_pass() -> None:
    with pytest.raises(ResolveError):
        await Guard(resolver=dns({})).vet("http://nowhere.invalid/")
    with pytest.raises(ResolveError):
        await Guard(resolver=dns({"empty.example": []})).vet("http://empty.example/")


async def test_allow_list_cidr_opens_only_its_range() -> None:
    guard = Guard(
        ["10.0.0.0/8", "127.0.0.1/32"], resolver=dns({"intranet.example": ["10.1.2.3"], "db.example": ["192.168.0.2"]})
    )
    assert (await guard.vet("http://intranet.example/")).ip == "10.1.2.3"
    assert (await guard.vet("http://127.0.0.1:8000/")).ip == "127.0.0.1"
    assert (await guard.vet("http://[::ffff:127.0.0.1]/")).ip == "::ffff:7f00:1"
    for url in ("http://db.example/", "http://127.0.0.2/", "http://[::1]/", "http://169.254.169.254/"):
        with pytest.raises(Blocked):
            await guard.vet(url)


async def test_allow_list_host_name_opens_that_name_but_not_metadata() -> None:
    resolver = dns({"wiki.corp": ["10.9.8.7"], "meta.corp": ["169.254.169.254"], "other.corp": ["10.9.8.7"]})
    guard = Guard(["wiki.corp", "meta.corp", "localhost"], resolver=resolver)
    assert (await guard.vet("http://WIKI.corp./page")).ip == "10.9.8.7"
    with pytest.raises(Blocked, match="metadata"):
        await guard.vet("http://meta.corp/")
    with pytest.raises(Blocked):
        await guard.vet("http://other.corp/")
    # A literal address is judged as an address: naming a host does not open its IP.
    with pytest.raises(Blocked):
        await guard.vet("http://10.9.8.7/")
    # Explicit CIDR for the metadata address is the only way in.
    assert (
        await Guard(["169.254.169.254/32"], resolver=resolver).vet("http://169.254.169.254/")
    ).ip == "169.254.169.254"


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7F.0.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),  # inet_aton reads a bare 0x as zero
        ("1.2.3.4.", "1.2.3.4"),
    ],
)
def test_ipv4_spellings(spelling: str, address: str) -> None:
    assert parse_ipv4(spelling) == ipaddress.IPv4Address(address)


@pytest.mark.parametrize(
    "name", ["example.com", "1.2.3.4.5", "08.0.0.1", "256.0.0.1", "1.2.3.x", "+1.2.3.4", "1..2", ""]
)
def test_names_that_are_not_ipv4(name: str) -> None:
    assert parse_ipv4(name) is None


@pytest.mark.parametrize(
    "network",
    ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "0.0.0.0/8"],
)
@given(data=st.data())
def test_every_spelling_of_a_private_ipv4_is_refused(network: str, data: st.DataObject) -> None:
    net = ipaddress.ip_network(network)
    ip = ipaddress.IPv4Address(data.draw(st.integers(int(net.network_address), int(net.broadcast_address))))
    octets = list(ip.packed)
    style = data.draw(st.sampled_from(["dotted", "decimal", "hex", "octal", "short", "mapped"]))
    spelling = {
        "dotted": str(ip),
        "decimal": str(int(ip)),
        "hex": ".".join(hex(o) for o in octets),
        "octal": ".".join("0" + oct(o)[2:] for o in octets),
        "short": f"{octets[0]}.{int.from_bytes(bytes(octets[1:]), 'big')}",
        "mapped": f"[::ffff:{ip}]",
    }[style]
    parsed = parse_ip(spelling)
    assert parsed is not None
    assert forbidden_reason(parsed) is not None, spelling
