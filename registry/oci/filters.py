"""Which references this node serves and advertises: `--mirrored-registries`, `--registry-filters`.

Why one object: serving (registry app) and advertising (state tracker) must agree exactly, so both
ask the same `ReferenceFilter.is_filtered(ref)`.  Semantics follow Spegel's:

- mirrored registries: empty, or containing `_default` / `*`, means every registry; otherwise only
  the hosts (with port, if any) of the given `http(s)://host[:port]` URLs are served.
- registry filters: regular expressions searched (unanchored, like Go's `MatchString`) in
  `registry/repository[:tag]`; any match filters the reference out.  Digests are never part of the
  subject, so a digest request is never filtered by a tag regex.

Bad configuration raises `ValueError` with a message naming the offending entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from registry.oci.reference import Reference, ReferenceError, validate_registry

__all__ = ["WILDCARD_REGISTRIES", "ReferenceFilter", "parse_mirrored_registry"]

WILDCARD_REGISTRIES = frozenset({"_default", "*"})


def parse_mirrored_registry(url: str) -> str:
    """`https://docker.io` -> `docker.io`; `http://foo:5000` -> `foo:5000`. Raises ValueError."""
    try:
        parts = urlsplit(url)
        port = parts.port  # validates the port range
    except ValueError as exc:
        raise ValueError(f"invalid mirrored registry URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid mirrored registry URL {url!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"invalid mirrored registry URL {url!r}: missing host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"invalid mirrored registry URL {url!r}: must not contain user info")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid mirrored registry URL {url!r}: must not have a path or query")
    host = parts.netloc
    try:
        validate_registry(host)
    except ReferenceError as exc:
        raise ValueError(f"invalid mirrored registry URL {url!r}: {exc}") from None
    del port
    return host


@dataclass(frozen=True, slots=True)
class ReferenceFilter:
    """Decides whether a reference is filtered out (not served, not advertised)."""

    registries: frozenset[str] | None = None  # None = every registry
    patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def from_config(
        cls, mirrored_registries: Iterable[str] = (), registry_filters: Iterable[str] = ()
    ) -> ReferenceFilter:
        """Build from flag values; raises ValueError on a bad URL or a bad regular expression."""
        entries = [entry.strip() for entry in mirrored_registries if entry.strip()]
        registries: frozenset[str] | None
        if not entries or any(entry in WILDCARD_REGISTRIES for entry in entries):
            registries = None
        else:
            registries = frozenset(parse_mirrored_registry(entry) for entry in entries)
        patterns: list[re.Pattern[str]] = []
        for expression in registry_filters:
            if not expression:
                raise ValueError("empty registry filter expression")
            try:
                patterns.append(re.compile(expression))
            except re.error as exc:
                raise ValueError(f"invalid registry filter {expression!r}: {exc}") from None
        return cls(registries=registries, patterns=tuple(patterns))

    def is_mirrored_registry(self, registry: str) -> bool:
        """True when requests and advertisements for `registry` are allowed at all."""
        return self.registries is None or registry in self.registries

    def is_filtered(self, ref: Reference) -> bool:
        """True when `ref` must not be served or advertised."""
        if not self.is_mirrored_registry(ref.registry):
            return True
        subject = ref.filter_subject
        return any(pattern.search(subject) for pattern in self.patterns)
