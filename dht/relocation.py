"""Proving that a node moved: the checks behind a routing-table address change.

Why: without the cluster key a node id is only a claim; one datagram carrying a known id from
another address must not re-point that contact.  When a known id speaks from a new address the
protocol core pings both addresses with fresh random transaction ids (the nonces) and expects
that id back: the contact moves only if the new address echoes its nonce AND the old address
stops answering (a node that still answers where we know it has not moved; the other address is
an impostor or a second process).  A node that really moved (restarted with a new IP) passes
both.  With the key, an authenticated datagram is proof enough and no check runs.

Pure state (no I/O, no clock): the core sends the pings and reports answers and timeouts here.
The number of checks running at once is bounded, one per id.
"""

from __future__ import annotations

from dataclasses import dataclass

from dht.ids import Contact

MAX_CHECKS = 64


@dataclass(slots=True)
class _Check:
    old: Contact
    new: Contact
    new_answered: bool = False
    old_silent: bool = False


class Relocations:
    """Address-change checks in progress, by node id."""

    def __init__(self, max_checks: int = MAX_CHECKS) -> None:
        self._max = max_checks
        self._checks: dict[bytes, _Check] = {}
        self.started = 0
        self.moved = 0
        self.refused = 0  # the old address still answered: the contact stayed

    def __len__(self) -> int:
        return len(self._checks)

    def start(self, old: Contact, new: Contact) -> bool:
        """Begin checking whether `old.node_id` moved to `new` (False: one runs, or too many)."""
        if old.node_id in self._checks or len(self._checks) >= self._max:
            return False
        self._checks[old.node_id] = _Check(old, new)
        self.started += 1
        return True

    def answered(self, node_id: bytes, addr: tuple[str, int]) -> Contact | None:
        """`node_id` answered its nonce from `addr`; returns the contact to move to, if proven."""
        check = self._checks.get(node_id)
        if check is None:
            return None
        if addr == check.old.addr:  # still where we know it: no move
            del self._checks[node_id]
            self.refused += 1
            return None
        if addr == check.new.addr:
            check.new_answered = True
        return self._settle(node_id, check)

    def silent(self, node_id: bytes, addr: tuple[str, int]) -> Contact | None:
        """The ping to `addr` for `node_id` timed out; returns the contact to move to, if proven."""
        check = self._checks.get(node_id)
        if check is None:
            return None
        if addr == check.new.addr:  # the claimed new address does not answer: no move
            del self._checks[node_id]
            self.refused += 1
            return None
        if addr == check.old.addr:
            check.old_silent = True
        return self._settle(node_id, check)

    def _settle(self, node_id: bytes, check: _Check) -> Contact | None:
        if check.new_answered and check.old_silent:
            del self._checks[node_id]
            self.moved += 1
            return check.new
        return None

    def checking(self, node_id: bytes) -> bool:
        return node_id in self._checks
