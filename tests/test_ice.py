"""SCOPE_ICE_ENFORCE_LIST: candidates gathered, accepted and answered only on listed addresses.

SCOPE_ICE_DENY_LIST: remote candidates in denied networks never reach the check list.
"""


import aioice
import aioice.ice
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from media_pipeline.ice import address_allowed, deny_remote_networks, enforce_ice_addresses

DEFAULT_DENY_LIST = ["0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "ff00::/8"]


@pytest.fixture
def loopback_only():
    enforce_ice_addresses(["127.0.0.1"])
    yield
    enforce_ice_addresses([])


async def test_gathers_only_listed_addresses(loopback_only) -> None:
    connection = aioice.Connection(ice_controlling=True)
    try:
        await connection.gather_candidates()
        assert {c.host for c in connection.local_candidates} == {"127.0.0.1"}
    finally:
        await connection.close()


async def test_ignores_remote_candidates_outside_the_list(loopback_only) -> None:
    connection = aioice.Connection(ice_controlling=True)
    try:
        await connection.gather_candidates()
        outside = aioice.Candidate("1", 1, "udp", 100, "192.0.2.10", 4000, "host")
        inside = aioice.Candidate("2", 1, "udp", 100, "127.0.0.1", 4001, "host")
        await connection.add_remote_candidate(outside)
        await connection.add_remote_candidate(inside)
        assert [c.host for c in connection.remote_candidates] == ["127.0.0.1"]
    finally:
        await connection.close()


def test_address_matching(loopback_only) -> None:
    assert address_allowed("127.0.0.1")
    assert not address_allowed("10.0.0.1")
    assert not address_allowed("abcd.local")  # mDNS names are not addresses
    enforce_ice_addresses([])
    assert address_allowed("10.0.0.1")


@pytest.fixture
def default_deny_list():
    deny_remote_networks(DEFAULT_DENY_LIST)
    yield
    deny_remote_networks([])


def host_candidate(foundation: str, host: str, port: int) -> aioice.Candidate:
    return aioice.Candidate(foundation, 1, "udp", 100, host, port, "host")


async def test_ignores_trickled_candidates_in_denied_networks(default_deny_list) -> None:
    connection = aioice.Connection(ice_controlling=True)
    try:
        await connection.gather_candidates()
        for n, host in enumerate(["169.254.169.254", "224.0.0.251", "0.0.0.1", "ff02::1", "::ffff:169.254.1.1",
                                  "192.0.2.10"]):
            await connection.add_remote_candidate(host_candidate(str(n), host, 4000 + n))
        assert [c.host for c in connection.remote_candidates] == ["192.0.2.10"]
    finally:
        await connection.close()


async def test_ignores_mdns_candidates_that_resolve_into_denied_networks(default_deny_list, monkeypatch) -> None:
    class Resolver:
        async def resolve(self, hostname: str) -> str:
            return {"metadata.local": "169.254.169.254", "laptop.local": "192.0.2.20"}[hostname]

    async def resolver(connection) -> Resolver:
        return Resolver()

    monkeypatch.setattr(aioice.ice, "get_or_create_mdns_protocol", resolver)
    connection = aioice.Connection(ice_controlling=True)
    try:
        await connection.gather_candidates()
        await connection.add_remote_candidate(host_candidate("1", "metadata.local", 4000))
        await connection.add_remote_candidate(host_candidate("2", "laptop.local", 4001))
        assert [c.host for c in connection.remote_candidates] == ["laptop.local"]
    finally:
        await connection.close()


async def test_ignores_offer_candidates_in_denied_networks(default_deny_list) -> None:
    client, server = RTCPeerConnection(), RTCPeerConnection()
    try:
        client.addTransceiver("video", direction="sendrecv")
        await client.setLocalDescription(await client.createOffer())
        sdp = client.localDescription.sdp.replace(
            "a=ice-ufrag", "a=candidate:9 1 udp 100 169.254.169.254 4000 typ host\r\n"
            "a=candidate:8 1 udp 100 192.0.2.30 4001 typ host\r\na=ice-ufrag", 1
        )
        await server.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        ice = server.getTransceivers()[0].receiver.transport.transport
        hosts = {c.ip for c in ice.getRemoteCandidates()}
        assert "192.0.2.30" in hosts
        assert "169.254.169.254" not in hosts
    finally:
        await client.close()
        await server.close()


def test_denied_addresses(default_deny_list) -> None:
    for denied in ("169.254.169.254", "224.0.0.1", "239.255.255.250", "0.0.0.0", "ff02::fb", "::ffff:169.254.0.1"):
        assert not address_allowed(denied), denied
    for allowed in ("127.0.0.1", "192.0.2.1", "10.0.0.1", "2001:db8::1", "abcd.local"):
        assert address_allowed(allowed), allowed
    deny_remote_networks([])
    assert address_allowed("169.254.169.254")
