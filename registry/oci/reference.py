"""Image references: digests, OCI repository/tag grammars, registry hosts, containerd image names.

Why a module of its own: the registry (paths, DHT keys), the state tracker (containerd image names
and events) and the filters all need one strict, shared notion of what a reference is.  Everything
here is pure; every rejection is a `ReferenceError` (a `ValueError`) saying what was wrong.

Only `sha256:<64 lowercase hex>` digests are accepted: that is what containerd and OCI use for
content we can verify; anything else would let unverifiable keys into the DHT.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "Reference",
    "ReferenceError",
    "is_digest",
    "parse_digest",
    "parse_image_name",
    "sha256_digest",
    "validate_registry",
    "validate_repository",
    "validate_tag",
]

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_DIGEST_SHAPE_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
MAX_REPOSITORY_LENGTH = 255


class ReferenceError(ValueError):
    """A digest, repository, tag, registry host or image name that does not parse."""


def sha256_digest(data: bytes) -> str:
    """The digest (`sha256:<64 hex>`) of `data`: the one helper every module uses."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(value: str) -> bool:
    """True when `value` is exactly `sha256:` followed by 64 lowercase hex digits."""
    return _DIGEST_RE.fullmatch(value) is not None


def parse_digest(value: str) -> str:
    """Return `value` if it is a supported digest, else raise `ReferenceError` saying why not."""
    if _DIGEST_RE.fullmatch(value):
        return value
    if not value:
        raise ReferenceError("empty digest")
    if ":" not in value:
        raise ReferenceError(f"invalid digest {value[:100]!r}: missing '<algorithm>:' prefix")
    algorithm, _, encoded = value.partition(":")
    if algorithm != "sha256":
        if _DIGEST_SHAPE_RE.fullmatch(value):
            raise ReferenceError(f"unsupported digest algorithm {algorithm[:40]!r} (only sha256)")
        raise ReferenceError(f"invalid digest {value[:100]!r}")
    if len(encoded) != 64:
        raise ReferenceError(f"invalid sha256 digest: {len(encoded)} hex digits, expected 64")
    raise ReferenceError("invalid sha256 digest: must be 64 lowercase hex digits")


def validate_repository(value: str) -> str:
    """Return `value` if it matches the OCI repository name grammar, else raise `ReferenceError`."""
    if not value:
        raise ReferenceError("empty repository name")
    if len(value) > MAX_REPOSITORY_LENGTH:
        raise ReferenceError(f"repository name longer than {MAX_REPOSITORY_LENGTH} characters")
    if _REPOSITORY_RE.fullmatch(value) is None:
        raise ReferenceError(f"invalid repository name {value[:100]!r}")
    return value


def validate_tag(value: str) -> str:
    """Return `value` if it matches the OCI tag grammar, else raise `ReferenceError`."""
    if _TAG_RE.fullmatch(value) is None:
        raise ReferenceError(f"invalid tag {value[:140]!r}")
    return value


def _split_port(value: str) -> tuple[str, str | None]:
    """Split `host[:port]` / `[v6][:port]`; raise on an unbracketed IPv6 or a malformed port."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ReferenceError(f"invalid registry host {value[:100]!r}: unclosed '['")
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ReferenceError(f"invalid registry host {value[:100]!r}")
        port = rest[1:] if rest else None
    elif value.count(":") > 1:
        raise ReferenceError(f"invalid registry host {value[:100]!r}: IPv6 addresses need brackets")
    else:
        host, sep, port_text = value.partition(":")
        port = port_text if sep else None
    if port is not None and (_PORT_RE.fullmatch(port) is None or not 0 < int(port) < 65536):
        raise ReferenceError(f"invalid port in registry host {value[:100]!r}")
    return host, port


def validate_registry(value: str) -> str:
    """Return `value` if it is a registry host (`name[:port]`, `ip[:port]`, `[v6][:port]`)."""
    if not value:
        raise ReferenceError("empty registry host")
    host, _ = _split_port(value)
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ReferenceError(f"invalid IPv6 address in registry host {value[:100]!r}") from None
    elif _HOSTNAME_RE.fullmatch(host) is None:
        raise ReferenceError(f"invalid registry host {value[:100]!r}")
    return value


def _looks_like_registry(component: str) -> bool:
    """Appendix B: ip[:port], [v6], localhost[:port], anything with a dot, a label with a port."""
    if component.startswith("[") or ":" in component or "." in component:
        return True
    return component == "localhost"


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference: registry host, repository, and a tag, a digest, or both."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        validate_registry(self.registry)
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            parse_digest(self.digest)
        if self.tag is None and self.digest is None:
            raise ReferenceError("reference needs a tag or a digest")

    @property
    def name(self) -> str:
        """`registry/repository`."""
        return f"{self.registry}/{self.repository}"

    @property
    def tag_key(self) -> str | None:
        """`registry/repository:tag` (the DHT key of a tag), or None when there is no tag."""
        return None if self.tag is None else f"{self.name}:{self.tag}"

    @property
    def identifier(self) -> str:
        """The DHT lookup key: the digest if present, else `registry/repository:tag`."""
        if self.digest is not None:
            return self.digest
        return f"{self.name}:{self.tag}"

    @property
    def filter_subject(self) -> str:
        """What `--registry-filters` regexes are matched against: `registry/repo[:tag]`."""
        return self.name if self.tag is None else f"{self.name}:{self.tag}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image_name(
    name: str,
    *,
    digest: str | None = None,
    require_digest: bool = True,
    allow_tag_only: bool = False,
    apply_defaults: bool = False,
) -> Reference:
    """Parse a containerd image name such as `docker.io/library/nginx:1.25[@sha256:…]` (Appendix B).

    - `digest`: the record's target digest, if known; must equal a digest in the name if both exist.
    - By default a digest is required (containerd listings always supply one).
      `allow_tag_only=True` (or `require_digest=False`) accepts a tag without a digest, e.g. for
      image event names.
    - `apply_defaults` (interactive input only): registry `docker.io`, `library/` for
      single-component Docker Hub names, tag `latest` when neither tag nor digest is given.
    """
    if not name:
        raise ReferenceError("empty image name")
    if "://" in name:
        raise ReferenceError(f"image name {name[:100]!r} must not contain a URL scheme")
    if any(ch.isspace() for ch in name):
        raise ReferenceError(f"image name {name[:100]!r} contains whitespace")
    if digest is not None:
        parse_digest(digest)

    components = name.split("/")
    registry: str | None = None
    if len(components) > 1 and _looks_like_registry(components[0]):
        registry = validate_registry(components[0])
        components = components[1:]

    last = components[-1]
    parsed_digest: str | None = None
    if "@" in last:
        last, _, digest_text = last.partition("@")
        parsed_digest = parse_digest(digest_text)
    tag: str | None = None
    if ":" in last:
        last, _, tag_text = last.partition(":")
        tag = validate_tag(tag_text)
    components[-1] = last
    repository = "/".join(components)

    if registry is None:
        if not apply_defaults:
            raise ReferenceError(f"image name {name[:100]!r} has no registry host")
        registry = "docker.io"
    if apply_defaults and registry == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    validate_repository(repository)

    if digest is not None and parsed_digest is not None and digest != parsed_digest:
        raise ReferenceError(
            f"digest {digest} does not match the digest {parsed_digest} in image name"
        )
    final_digest = parsed_digest if parsed_digest is not None else digest
    if final_digest is None:
        if require_digest and not allow_tag_only and not apply_defaults:
            raise ReferenceError(f"image name {name[:100]!r} needs a digest")
        if tag is None:
            if not apply_defaults:
                raise ReferenceError(f"image name {name[:100]!r} needs a tag or a digest")
            tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag, digest=final_digest)
