"""ICE address restriction (``SCOPE_ICE_ENFORCE_LIST``).

aioice gathers host candidates from every interface but loopback, and offers no
option to choose them. With an enforce list the process gathers candidates on
exactly the listed addresses (loopback included when listed), drops remote
candidates outside the list (from the SDP or trickled), and leaves STUN checks from elsewhere unanswered.
"""

import ipaddress
import logging
from collections.abc import Iterable

import aioice.ice

logger = logging.getLogger(__name__)

_enforced: frozenset[str] = frozenset()
_original_get_host_addresses = aioice.ice.get_host_addresses
_original_request_received = aioice.ice.Connection.request_received
_original_add_remote_candidate = aioice.ice.Connection.add_remote_candidate


def _normalized(address: str) -> str:
    return str(ipaddress.ip_address(address.strip().strip("[]")))


def enforce_ice_addresses(addresses: Iterable[str]) -> None:
    """Restrict this process's ICE to ``addresses``; an empty list lifts the restriction."""
    global _enforced
    _enforced = frozenset(_normalized(a) for a in addresses)
    if _enforced:
        aioice.ice.get_host_addresses = _enforced_host_addresses
        aioice.ice.Connection.request_received = _request_received_from_enforced
        aioice.ice.Connection.add_remote_candidate = _add_enforced_remote_candidate
    else:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        aioice.ice.Connection.request_received = _original_request_received
        aioice.ice.Connection.add_remote_candidate = _original_add_remote_candidate


def address_allowed(address: str) -> bool:
    if not _enforced:
        return True
    try:
        return _normalized(address) in _enforced
    except ValueError:
        return False  # an mDNS name or garbage: not an enforced address



def _enforced_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return [
        a for a in sorted(_enforced)
        if (use_ipv4 and ipaddress.ip_address(a).version == 4) or (use_ipv6 and ipaddress.ip_address(a).version == 6)
    ]


def _request_received_from_enforced(self, message, addr, protocol) -> None:
    if address_allowed(addr[0]):
        _original_request_received(self, message, addr, protocol)


async def _add_enforced_remote_candidate(self, remote_candidate) -> None:
    if remote_candidate is None or address_allowed(remote_candidate.host):
        await _original_add_remote_candidate(self, remote_candidate)
