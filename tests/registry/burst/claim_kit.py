"""Node ids and sightings for the claim state machine's tests (pure values, no I/O)."""

from __future__ import annotations

from registry.burst.provider_choice import RecordState, Sighting


def node(i: int) -> bytes:
    """Node number `i`'s DHT id."""
    return i.to_bytes(32, "big")


def sighting(i: int, state: RecordState) -> Sighting:
    """Node `i`'s record of `state`, at its own address."""
    return Sighting(node(i), (f"10.0.0.{i}", 5000), state)
