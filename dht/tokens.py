"""Write tokens for ADD_PROVIDER, BEP 5 style.

Why: a node may only announce itself. Every reply carries a token bound to the requester's IP and a
secret that rotates; ADD_PROVIDER must echo a token we gave that IP recently (the current or the
previous secret), and the record's IP is the datagram's source. Spoofing another IP would need its
token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

TOKEN_BYTES = 8


class TokenIssuer:
    def __init__(self, random_bytes: Callable[[int], bytes], rotate_every: float = 300.0) -> None:
        self._random_bytes = random_bytes
        self._rotate_every = rotate_every
        self._current = random_bytes(32)
        self._previous = random_bytes(32)
        self._rotates_at: float | None = None

    def _maybe_rotate(self, now: float) -> None:
        if self._rotates_at is None:
            self._rotates_at = now + self._rotate_every
        elif now >= self._rotates_at:
            # after a long idle period both secrets are stale
            stale = now >= self._rotates_at + self._rotate_every
            self._previous = self._random_bytes(32) if stale else self._current
            self._current = self._random_bytes(32)
            self._rotates_at = now + self._rotate_every

    @staticmethod
    def _mac(secret: bytes, ip: str) -> bytes:
        mac = hmac.new(secret, ip.encode("ascii", "replace"), hashlib.sha256)
        return mac.digest()[:TOKEN_BYTES]

    def issue(self, ip: str, now: float) -> bytes:
        self._maybe_rotate(now)
        return self._mac(self._current, ip)

    def check(self, ip: str, token: bytes, now: float) -> bool:
        self._maybe_rotate(now)
        return hmac.compare_digest(token, self._mac(self._current, ip)) or hmac.compare_digest(
            token, self._mac(self._previous, ip)
        )
