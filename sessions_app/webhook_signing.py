"""Signing webhook bodies, and the verifier operators copy (docs/operations.md shows ``verify`` verbatim).

The signature is ``sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` keyed
with the endpoint's secret; the timestamp (unix seconds) is sent as
``Scope-Timestamp``, so a captured request cannot be replayed later than the
receiver's tolerance.
"""

import hashlib
import hmac
import time


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``Scope-Signature`` header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, body: bytes, timestamp: str, signature: str, tolerance: int = 300) -> bool:
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False  # stale (or from the future): reject, it may be a replay
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature, "sha256=" + expected)
