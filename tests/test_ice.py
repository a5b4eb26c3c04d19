"""SCOPE_ICE_ENFORCE_LIST: candidates gathered, accepted and answered only on listed addresses."""


import aioice
import pytest

from media_pipeline.ice import address_allowed, enforce_ice_addresses


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
