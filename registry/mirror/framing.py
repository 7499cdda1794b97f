"""How a peer's answer is framed for our client: the mirror response head and the 416 failure.

Why pure and apart: the forwarder decides which peer's answer goes out; the head it sends (200 or
206, digest, type, length, range, Accept-Ranges for blobs) depends only on that answer and the
requested range, so it is a function tested and read without the forwarder's machinery.
"""

from __future__ import annotations

from registry.interfaces import Peer, PeerState
from registry.mirror.job import MirrorFailure, MirrorHead
from registry.mirror.peer_answer import PeerAnswer
from registry.oci.distribution import ErrorCode
from registry.oci.mediatypes import OCTET_STREAM
from registry.oci.ranges import ByteRange

__all__ = ["mirror_head", "range_not_satisfiable"]


def mirror_head(
    answer: PeerAnswer, delivered: ByteRange | None, *, is_blob: bool, peer: Peer | None = None
) -> MirrorHead:
    """The head for sending `answer` (`delivered`: the range of it sent, None for all of it)."""
    headers = [("Docker-Content-Digest", answer.digest)]
    if delivered is None:
        headers += [("Content-Type", answer.media_type), ("Content-Length", str(answer.size))]
        status = 200
    else:
        headers += [
            ("Content-Type", OCTET_STREAM),
            ("Content-Length", str(delivered.length)),
            ("Content-Range", delivered.content_range),
        ]
        status = 206
    if is_blob:
        headers.append(("Accept-Ranges", "bytes"))
    inflight = peer is not None and peer.state is PeerState.INFLIGHT
    return MirrorHead(status, tuple(headers), inflight)


def range_not_satisfiable(size: int) -> MirrorFailure:
    return MirrorFailure(
        416,
        ErrorCode.RANGE_INVALID,
        f"range not satisfiable for {size} bytes",
        0,
        (("Content-Range", f"bytes */{size}"),),
    )
