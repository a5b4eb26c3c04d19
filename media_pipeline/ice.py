"""ICE address restrictions: ``SCOPE_ICE_ENFORCE_LIST`` and ``SCOPE_ICE_DENY_LIST``.

aioice gathers host candidates from every interface but loopback, and offers no
option to choose them. With an enforce list the process gathers candidates on
exactly the listed addresses (loopback included when listed), drops remote
candidates outside the list (from the SDP or trickled), and leaves STUN checks from elsewhere unanswered.

The deny list names networks a client must not point the worker's STUN checks
at. A remote candidate in one is dropped where aioice adds it at its network
address (an mDNS name's, once resolved), so neither the offer's candidates nor
trickled ones reach the check list; checks from a denied address go
unanswered, so none is learned as peer-reflexive either.
"""

import ipaddress
import logging
from collections.abc import Iterable

import aioice.ice
from aiortc import RTCPeerConnection
from aiortc.sdp import candidate_from_sdp

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_enforced: frozenset[str] = frozenset()
_denied: tuple[IPNetwork, ...] = ()
_original_get_host_addresses = aioice.ice.get_host_addresses
_original_request_received = aioice.ice.Connection.request_received
_original_add_remote_candidate = aioice.ice.Connection.add_remote_candidate
# Where aioice adds a remote candidate at its network address, resolved mDNS names included.
_original_add_resolved_remote_candidate = aioice.ice.Connection._add_remote_candidate


def _normalized(address: str) -> str:
    return str(ipaddress.ip_address(address.strip().strip("[]")))


def enforce_ice_addresses(addresses: Iterable[str]) -> None:
    """Restrict this process's ICE to ``addresses``; an empty list lifts the restriction."""
    global _enforced
    _enforced = frozenset(_normalized(a) for a in addresses)
    _install()


def deny_remote_networks(networks: Iterable[str]) -> None:
    """Never contact remote candidates in ``networks`` (CIDRs); an empty list lifts the restriction."""
    global _denied
    _denied = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks)
    _install()


def _install() -> None:
    filtering = bool(_enforced or _denied)
    aioice.ice.get_host_addresses = _enforced_host_addresses if _enforced else _original_get_host_addresses
    connection = aioice.ice.Connection
    connection.request_received = _request_received_if_allowed if filtering else _original_request_received
    connection.add_remote_candidate = _add_remote_candidate_if_enforced if _enforced else _original_add_remote_candidate
    connection._add_remote_candidate = (
        _add_resolved_remote_candidate_if_allowed if filtering else _original_add_resolved_remote_candidate
    )


def address_allowed(address: str) -> bool:
    """Whether ICE may talk to ``address``: listed (when there is an enforce list), and not denied."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        # An mDNS name or garbage: not an enforced address. Without an enforce
        # list, an mDNS name is judged by the address it resolves to.
        return not _enforced
    if _enforced and str(ip) not in _enforced:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return not any(ip in network for network in _denied)


def _enforced_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return [
        a for a in sorted(_enforced)
        if (use_ipv4 and ipaddress.ip_address(a).version == 4) or (use_ipv6 and ipaddress.ip_address(a).version == 6)
    ]


def _request_received_if_allowed(self, message, addr, protocol) -> None:
    if address_allowed(addr[0]):
        _original_request_received(self, message, addr, protocol)


async def _add_remote_candidate_if_enforced(self, remote_candidate) -> None:
    # Checked before aioice resolves anything: with an enforce list an mDNS name is not even looked up.
    if remote_candidate is None or address_allowed(remote_candidate.host):
        await _original_add_remote_candidate(self, remote_candidate)


def _add_resolved_remote_candidate_if_allowed(self, remote_candidate, network_host: str) -> None:
    if address_allowed(network_host):
        _original_add_resolved_remote_candidate(self, remote_candidate, network_host)


async def add_remote_candidate(pc: RTCPeerConnection, raw: dict | None, *, owner: str) -> None:
    """A trickled remote candidate (None or an empty one: the end of candidates); a malformed one is ignored."""
    if raw is None or not raw.get("candidate"):
        await pc.addIceCandidate(None)
        return
    try:
        candidate = candidate_from_sdp(raw["candidate"].removeprefix("candidate:"))
        candidate.sdpMid = raw.get("sdpMid")
        candidate.sdpMLineIndex = raw.get("sdpMLineIndex")
        if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
            candidate.sdpMLineIndex = 0
        await pc.addIceCandidate(candidate)
    except (AssertionError, ValueError, IndexError) as exc:
        logger.info("%s: ignored a malformed ICE candidate: %s", owner, exc)
