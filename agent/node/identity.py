"""The node's DHT id: 32 random bytes, kept in the data dir so it survives restarts.

Why persist it: peers and provider records refer to a node by id; a new id per restart leaves stale
contacts in everyone's routing tables until they time out. With an empty data dir the id is fresh
per start (Spegel's behaviour without `--data-dir`).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile

logger = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
NODE_ID_BYTES = 32


def load_or_create_node_id(data_dir: str) -> bytes:
    """Return the id stored in `<data_dir>/node-id` (hex), creating it (0600, dir 0755) if absent.

    A malformed file is replaced with a new id (and a warning): the id carries no secret, and a node
    that refuses to start over it would take its mirror down for nothing.
    """
    if not data_dir:
        return secrets.token_bytes(NODE_ID_BYTES)
    path = os.path.join(data_dir, NODE_ID_FILE)
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning(
            "node id file unreadable, creating a new id", extra={"path": path, "error": str(exc)}
        )
        text = None
    if text is not None:
        try:
            node_id = bytes.fromhex(text)
        except ValueError:
            node_id = b""
        if len(node_id) == NODE_ID_BYTES:
            return node_id
        logger.warning("node id file malformed, creating a new id", extra={"path": path})
    node_id = secrets.token_bytes(NODE_ID_BYTES)
    os.makedirs(data_dir, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".node-id.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(node_id.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("created node id", extra={"path": path, "node_id": node_id.hex()})
    return node_id
