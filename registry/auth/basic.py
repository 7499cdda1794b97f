"""HTTP Basic authentication between containerd, this agent and its peers (Spegel's scheme).

Why its own module: the decision must come before anything is looked up (an answer that depends
on whether a tag or digest exists would tell an unauthenticated client what the node holds).  So
it is one pure function, `authorized(auth, header)`, that the registry's one classification
(`registry.serve.classify`) calls first.  Credentials live in two files, `username` and
`password`, in one directory (Spegel's `/etc/secrets/basic-auth`, where a Secret is mounted);
either alone is enough to turn authentication on.  Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

__all__ = [
    "DEFAULT_DIR",
    "BasicAuth",
    "BasicAuthError",
    "authorized",
    "load_basic_auth",
]

DEFAULT_DIR = "/etc/secrets/basic-auth"
MAX_FIELD = 4096  # longer credential files are a mistake, not credentials


class BasicAuthError(ValueError):
    """The credential files exist but cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True, repr=False)
class BasicAuth:
    """One username/password pair (either may be empty); never printed."""

    username: str
    password: str

    def __repr__(self) -> str:
        return "BasicAuth(<redacted>)"

    @property
    def header_value(self) -> str:
        """The `Authorization` value peers and containerd send: `Basic base64(user:password)`."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _credentials(header: str) -> tuple[bytes, bytes] | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        encoded = token.strip().encode("ascii")
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    if base64.b64encode(decoded) != encoded:
        return None  # only the one canonical encoding (no extra padding or stray bits)
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


def authorized(auth: BasicAuth | None, header: str | None) -> bool:
    """May a request carrying this `Authorization` header (None: absent) be served?

    Without configured credentials every request may.  With them, the header must be `Basic`
    with exactly the configured username and password, compared in constant time.
    """
    if auth is None:
        return True
    given = _credentials(header) if header is not None else None
    user, password = given if given is not None else (b"", b"")
    # compared as digests: equal lengths, so not even the length of a secret shows in the timing
    user_ok = hmac.compare_digest(_digest(user), _digest(auth.username.encode()))
    password_ok = hmac.compare_digest(_digest(password), _digest(auth.password.encode()))
    return given is not None and user_ok & password_ok


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _read_field(directory: str, name: str) -> str | None:
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FIELD + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BasicAuthError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FIELD:
        raise BasicAuthError(f"{path} is longer than {MAX_FIELD} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BasicAuthError(f"{path} is not UTF-8 text") from None
    # `echo secret > file` leaves a line end that nobody means as part of the password
    text = text.removesuffix("\n").removesuffix("\r")
    if name == "username" and ":" in text:
        raise BasicAuthError(f"{path}: a Basic auth username cannot contain ':'")
    if any(ch in text for ch in "\r\n"):
        raise BasicAuthError(f"{path} holds more than one line")
    return text


def load_basic_auth(directory: str) -> BasicAuth | None:
    """Credentials from `<directory>/username` and `<directory>/password`; None when neither
    file exists (or `directory` is empty), i.e. authentication is off."""
    if not directory:
        return None
    username = _read_field(directory, "username")
    password = _read_field(directory, "password")
    if username is None and password is None:
        return None
    return BasicAuth(username or "", password or "")
