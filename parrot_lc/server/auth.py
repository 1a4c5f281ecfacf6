"""API keys: `Authorization: Bearer KEY`, checked the same way by the manager and by engine processes."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


def matching_key(authorization: str | None, keys: Sequence[bytes]) -> int | None:
    """The index in `keys` of the key the header carries (None: none of them). Every key is compared, in constant
    time, so the time taken tells nothing of which (if any) matched."""
    scheme, _, key = (authorization or "").partition(" ")
    given = key.encode("utf-8", "replace")  # a header is Latin-1 text; the keys' bytes are UTF-8
    matches = [hmac.compare_digest(given, known) for known in keys]
    if scheme.lower() != "bearer" or not any(matches):
        return None
    return matches.index(True)


def bearer_key_ok(authorization: str | None, keys: Sequence[bytes]) -> bool:
    """Whether the header carries one of `keys` (see `matching_key`)."""
    return matching_key(authorization, keys) is not None
