"""API keys: `Authorization: Bearer KEY`, checked the same way by the manager and by engine processes."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


def bearer_key_ok(authorization: str | None, keys: Sequence[bytes]) -> bool:
    """Whether the header carries one of `keys`. Every key is compared, in constant time, so the time taken
    tells nothing of which (if any) matched."""
    scheme, _, key = (authorization or "").partition(" ")
    matches = [hmac.compare_digest(key.encode(), known) for known in keys]
    return scheme.lower() == "bearer" and any(matches)
