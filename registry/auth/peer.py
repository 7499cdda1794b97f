"""Peer credentials derived from the cluster key: who may ask, and whose tag answers count.

Why its own module: the cluster key (the Secret every agent mounts) is what separates agents from
any other pod on the cluster network.  Two uses of it live here, both pure (the caller passes the
clock; the only state is a bounded memory of nonces already used):

* a request credential, ``Authorization: Spegla-Peer t=<unix s>,n=<nonce>,m=<mac>``, an HMAC over
  the method, path, ``ns``, timestamp and nonce.  A peer's server accepts it instead of the Basic
  password, so the password never has to leave the node.  Replays are bounded by the timestamp
  window and by refusing a nonce seen within it;
* an answer proof, header ``Spegla-Peer-Answer``, an HMAC over (the request's nonce, the digest the
  answer names, the reference asked for).  A requester uses a peer's ``Docker-Content-Digest`` for a
  tag only when this proof verifies, so only a key holder decides what a tag means; digests need no
  proof (their bytes are checked against the digest).

Each use has its own key, derived from the cluster key with HKDF-SHA256 (RFC 5869) and a label;
the DHT's datagram MAC keeps using the key itself.  Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from registry.auth.basic import BasicAuth, authorized

__all__ = [
    "ANSWER_HEADER",
    "MIN_KEY_BYTES",
    "SCHEME",
    "PeerAuth",
    "PeerCredential",
    "admit",
    "hkdf_sha256",
    "parse_credential",
]

SCHEME = "Spegla-Peer"
ANSWER_HEADER = "Spegla-Peer-Answer"
MIN_KEY_BYTES = 16
WINDOW = 30.0  # seconds a credential's timestamp may differ from the verifier's clock
MAX_NONCES = 1 << 17  # nonces remembered within the window (oldest forgotten first beyond it)
MAX_HEADER = 256  # a valid credential is ~110 characters; longer is not one
NONCE_BYTES = 16
MAC_BYTES = 32


def hkdf_sha256(key: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF (RFC 5869) with SHA-256, no salt: one key per purpose from the cluster key."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF length out of range")
    prk = hmac.new(b"\x00" * 32, key, hashlib.sha256).digest()
    out, block = b"", b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, size: int) -> bytes | None:
    if len(text) != (size * 8 + 5) // 6:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size and _b64(raw) == text else None


def _fields(*parts: str) -> bytes:
    """Length-prefixed fields, so no choice of values can make two field lists collide."""
    out = bytearray()
    for part in parts:
        data = part.encode("utf-8", "surrogateescape")
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


@dataclass(frozen=True, slots=True)
class PeerCredential:
    """A parsed `Spegla-Peer` credential (its MAC not yet checked)."""

    timestamp: int
    nonce: str  # base64url of NONCE_BYTES random bytes
    mac: bytes


def parse_credential(header: str | None) -> PeerCredential | None:
    """The credential in an `Authorization` value, or None when it is not a well-formed one."""
    if header is None or len(header) > MAX_HEADER:
        return None
    scheme, _, params = header.strip().partition(" ")
    if scheme != SCHEME:
        return None
    values: dict[str, str] = {}
    for item in params.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name in values:
            return None
        values[name] = value
    if set(values) != {"t", "n", "m"}:
        return None
    stamp = values["t"]
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        return None
    mac = _unb64(values["m"], MAC_BYTES)
    if _unb64(values["n"], NONCE_BYTES) is None or mac is None:
        return None
    return PeerCredential(int(stamp), values["n"], mac)


class PeerAuth:
    """Makes and checks peer credentials and answer proofs with one cluster key."""

    def __init__(
        self,
        cluster_key: bytes,
        *,
        window: float = WINDOW,
        max_nonces: int = MAX_NONCES,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if len(cluster_key) < MIN_KEY_BYTES:
            raise ValueError(f"the cluster key must hold at least {MIN_KEY_BYTES} bytes")
        self._request_key = hkdf_sha256(cluster_key, b"spegla peer request v1")
        self._answer_key = hkdf_sha256(cluster_key, b"spegla peer answer v1")
        self._window = window
        self._random = random_bytes
        self._now = 0.0  # the caller's clock as of the last check (the nonce memory's timer)
        # a nonce must be refused for as long as its timestamp can still pass: twice the window
        self._seen: TTLCache[str, bool] = TTLCache(
            maxsize=max_nonces, ttl=2 * window, timer=lambda: self._now
        )

    def __repr__(self) -> str:
        return "PeerAuth(<redacted>)"

    def _request_mac(self, method: str, path: str, ns: str, stamp: int, nonce: str) -> bytes:
        message = _fields(method, path, ns, str(stamp), nonce)
        return hmac.new(self._request_key, message, hashlib.sha256).digest()

    def sign(self, method: str, path: str, ns: str, now: float) -> tuple[str, str]:
        """(`Authorization` value, its nonce) for one request to a peer."""
        nonce = _b64(self._random(NONCE_BYTES))
        stamp = int(now)
        mac = self._request_mac(method, path, ns, stamp, nonce)
        return f"{SCHEME} t={stamp},n={nonce},m={_b64(mac)}", nonce

    def check(
        self, header: str | None, method: str, path: str, ns: str, now: float, *, consume: bool
    ) -> PeerCredential | None:
        """The credential when `header` is a valid one for this request at `now`, else None.

        `consume`: remember its nonce, so the same credential is refused from now on (the place
        that answers the request consumes; checks made earlier on the way only look)."""
        credential = parse_credential(header)
        if credential is None or abs(now - credential.timestamp) > self._window:
            return None
        expected = self._request_mac(method, path, ns, credential.timestamp, credential.nonce)
        if not hmac.compare_digest(expected, credential.mac):
            return None
        self._now = max(self._now, now)
        if credential.nonce in self._seen:
            return None  # a replay
        if consume:
            self._seen[credential.nonce] = True
        return credential

    def answer_proof(self, nonce: str, digest: str, reference: str) -> str:
        """The `Spegla-Peer-Answer` value vouching that `digest` answers `reference` now."""
        mac = hmac.new(self._answer_key, _fields(nonce, digest, reference), hashlib.sha256)
        return _b64(mac.digest())

    def answer_ok(self, nonce: str, digest: str, reference: str, proof: str | None) -> bool:
        """True when `proof` (the peer's header, None: absent) vouches for this answer."""
        if proof is None or len(proof) > MAX_HEADER:
            return False
        expected = self.answer_proof(nonce, digest, reference).encode("ascii")
        return hmac.compare_digest(expected, proof.strip().encode("utf-8", "replace"))


def admit(
    basic: BasicAuth | None,
    auth: PeerAuth | None,
    header: str | None,
    method: str,
    path: str,
    ns: str | None,
    now: float,
    *,
    consume: bool = False,
) -> tuple[bool, PeerCredential | None]:
    """(may this request be served, its valid peer credential or None).

    Served: with Basic credentials when those are configured (`registry.auth.basic`, open when
    not), or with a valid cluster-key credential for this very request (method, path, `ns`).
    `consume` spends the credential's nonce: set by the place that answers the request."""
    credential = None
    if auth is not None and header is not None:
        credential = auth.check(header, method, path, ns or "", now, consume=consume)
    return credential is not None or authorized(basic, header), credential
