"""containerd `hosts.toml` mirror configuration: render (pure), install with a one-time backup,
clean up.

Why: containerd only asks a mirror when `<config_path>/<registry>/hosts.toml` lists it. The
rendered file must work on containerd 1.6 through 2.x: explicit `http://` mirror URLs (no scheme
means https), at least one `[host]` table (1.6 silently ignores a file without one), `capabilities`
pull/resolve or pull only, and `dial_timeout` (ignored by < 2.1, bounds the connect to a dead agent
on newer ones). Whatever was in the directory before the first install is moved to `_backup` once
and put back by `cleanup`, so uninstalling leaves the node as it was. A later install replaces only
what spegla wrote (hosts.toml starting with `MANAGED_HEADER`): a registry directory an admin added
since stays, or goes into the backup when spegla now writes that same registry. Files are written
with tomli-w, so any value (control characters too) comes out as valid TOML.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from agent.config import ConfigError, MirrorConfig, format_duration
from agent.containerd import snippets as snippets
from registry.auth.basic import BasicAuth, BasicAuthError, load_basic_auth

logger = logging.getLogger(__name__)

BACKUP_DIR = "_backup"
MANAGED_HEADER = "# written by `spegla configuration`; `spegla cleanup` restores what was here"
_BACKUP_PENDING = ".spegla-backup-pending"
DEFAULT_REGISTRY = "_default"


def encapsulate_ipv6(url: str) -> str:
    """`http://fd00::1:30020` -> `http://[fd00::1]:30020` (a bare v6 literal with a port)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if netloc.count(":") > 1 and not netloc.startswith("["):
        host, _, port = netloc.rpartition(":")
        netloc = f"[{host}]:{port}" if port.isdigit() else f"[{netloc}]"
    return f"{scheme}://{netloc}{slash}{path}"


def registry_dir_name(registry: str) -> str:
    """The certs.d sub-directory containerd looks up for a mirrored registry URL (`host[:port]`)."""
    if registry in (DEFAULT_REGISTRY, "*"):
        return DEFAULT_REGISTRY
    netloc = urlsplit(registry).netloc
    if not netloc or "/" in netloc or netloc in (".", ".."):
        raise ConfigError(f"mirrored registry {registry!r} has no usable host")
    if not netloc.isascii() or not netloc.isprintable() or any(c.isspace() for c in netloc):
        raise ConfigError(
            f"mirrored registry {registry!r}: the host must be printable ASCII (IDNA for others)"
        )
    return netloc


def server_url(registry: str) -> str | None:
    """The upstream `server` line: none for `_default`; Docker Hub's real endpoint for docker.io."""
    if registry in (DEFAULT_REGISTRY, "*"):
        return None
    parts = urlsplit(registry)
    if parts.netloc == "docker.io":
        return f"{parts.scheme}://registry-1.docker.io"
    return registry.rstrip("/")


def render_hosts_toml(
    registry: str,
    targets: Sequence[str],
    *,
    resolve_tags: bool = True,
    dial_timeout: float = 0.2,
    existing_hosts: Mapping[str, Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """The hosts.toml text for one mirrored registry: our mirrors first, then the previous ones.

    `headers` (e.g. the Basic auth `Authorization`) go into a `[host.'<target>'.header]` table of
    each of our mirror targets, so containerd sends them to every agent it asks."""
    if not targets:
        raise ConfigError("at least one mirror target is needed")
    doc: dict[str, Any] = {}
    server = server_url(registry)
    if server is not None:
        doc["server"] = server
    capabilities = ["pull", "resolve"] if resolve_tags else ["pull"]
    hosts: dict[str, Any] = {}
    for target in targets:
        table: dict[str, Any] = {
            "capabilities": capabilities,
            "dial_timeout": format_duration(dial_timeout),
        }
        if headers:
            table["header"] = dict(headers)
        hosts[encapsulate_ipv6(target)] = table
    for url, old in (existing_hosts or {}).items():
        hosts.setdefault(url, dict(old))
    doc["host"] = hosts
    # tomli-w escapes every string (control characters included): valid TOML for any input
    return MANAGED_HEADER + "\n" + tomli_w.dumps(doc)


def is_managed(directory: str) -> bool:
    """A certs.d entry spegla wrote: a directory whose hosts.toml starts with `MANAGED_HEADER`."""
    try:
        with open(os.path.join(directory, "hosts.toml"), encoding="utf-8", errors="replace") as fh:
            return fh.readline().rstrip("\n") == MANAGED_HEADER
    except OSError:
        return False


def _existing_host_tables(backup_dir: str) -> dict[str, Mapping[str, Any]]:
    path = os.path.join(backup_dir, "hosts.toml")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        logger.warning(
            "existing hosts.toml unreadable, not prepended", extra={"path": path, "error": str(exc)}
        )
        return {}
    hosts = data.get("host")
    if not isinstance(hosts, dict):
        return {}
    return {str(url): table for url, table in hosts.items() if isinstance(table, dict)}


def _atomic_write(path: str, text: str, mode: int = 0o644) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hosts.toml.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _entries_except(directory: str, keep: Iterable[str]) -> list[str]:
    skip = set(keep)
    return sorted(name for name in os.listdir(directory) if name not in skip)


def ensure_backup(config_path: str) -> str:
    """Move what is in `config_path` into `_backup`, once (a later install keeps the first backup).

    The move goes through a pending directory renamed at the end, so a crash halfway never leaves a
    `_backup` missing entries (the next run finishes the move).
    """
    backup = os.path.join(config_path, BACKUP_DIR)
    if os.path.isdir(backup):
        return backup
    pending = os.path.join(config_path, _BACKUP_PENDING)
    os.makedirs(pending, mode=0o755, exist_ok=True)
    for name in _entries_except(config_path, (_BACKUP_PENDING,)):
        os.replace(os.path.join(config_path, name), os.path.join(pending, name))
    os.replace(pending, backup)
    logger.info("backed up existing containerd registry config", extra={"path": backup})
    return backup


def configure(cfg: MirrorConfig) -> list[str]:
    """Install hosts.toml files for every mirrored registry; returns the paths written."""
    registries = list(cfg.mirrored_registries) or [DEFAULT_REGISTRY]
    if any(r in (DEFAULT_REGISTRY, "*") for r in registries):
        registries = [DEFAULT_REGISTRY] + [
            r for r in registries if r not in (DEFAULT_REGISTRY, "*")
        ]
    dirs = [registry_dir_name(r) for r in registries]  # validate before touching anything
    auth = _basic_auth(cfg.basic_auth_dir)
    headers = {"Authorization": auth.header_value} if auth is not None else None
    os.makedirs(cfg.config_path, mode=0o755, exist_ok=True)
    backup = ensure_backup(cfg.config_path)
    _clear_for_install(cfg.config_path, backup, set(dirs))
    written: list[str] = []
    for registry, dir_name in zip(registries, dirs, strict=True):
        target_dir = os.path.join(cfg.config_path, dir_name)
        os.makedirs(target_dir, mode=0o755, exist_ok=True)
        existing: dict[str, Mapping[str, Any]] = {}
        if cfg.prepend_existing:
            old_dir = os.path.join(backup, dir_name)
            existing = _existing_host_tables(old_dir)
            if os.path.isdir(old_dir):
                for name in _entries_except(old_dir, ("hosts.toml",)):
                    src = os.path.join(old_dir, name)
                    dst = os.path.join(target_dir, name)
                    if os.path.isdir(src):
                        shutil.copytree(src, dst, symlinks=True)
                    else:
                        shutil.copy2(src, dst, follow_symlinks=False)
        text = render_hosts_toml(
            registry,
            cfg.mirror_targets,
            resolve_tags=cfg.resolve_tags,
            dial_timeout=cfg.dial_timeout,
            existing_hosts=existing,
            headers=headers,
        )
        path = os.path.join(target_dir, "hosts.toml")
        # credentials in the file: readable by root (containerd) only
        _atomic_write(path, text, 0o600 if headers else 0o644)
        written.append(path)
        logger.info(
            "wrote containerd mirror configuration", extra={"path": path, "registry": registry}
        )
    return written


def _clear_for_install(config_path: str, backup: str, ours: set[str]) -> None:
    """Remove what an earlier install wrote. An entry someone else added after that install is
    kept where it is, unless this install writes the same registry directory: then it goes into
    the backup (under a free name), so `cleanup` puts it back."""
    for name in _entries_except(config_path, (BACKUP_DIR,)):
        path = os.path.join(config_path, name)
        if is_managed(path):
            _remove(path)
        elif name in ours:
            kept = _free_name(backup, name)
            os.replace(path, kept)
            logger.warning(
                "moved a registry directory added after the first install into the backup",
                extra={"path": path, "backup": kept},
            )
        else:
            logger.info("left a registry directory spegla did not write", extra={"path": path})


def _free_name(directory: str, name: str) -> str:
    candidate = os.path.join(directory, name)
    n = 1
    while os.path.lexists(candidate):
        candidate = os.path.join(directory, f"{name}.{n}")
        n += 1
    return candidate


def _basic_auth(directory: str) -> BasicAuth | None:
    try:
        auth = load_basic_auth(directory)
    except BasicAuthError as exc:
        raise ConfigError(f"--basic-auth-dir: {exc}") from None
    if auth is not None:
        logger.info("mirrors get the basic auth header", extra={"basic_auth_dir": directory})
    return auth


def cleanup(config_path: str) -> bool:
    """Put back what `configure` backed up and remove what it wrote (entries someone else added
    since stay); returns False when there was nothing to restore."""
    backup = os.path.join(config_path, BACKUP_DIR)
    if not os.path.isdir(backup):
        logger.info("no backup to restore", extra={"path": config_path})
        return False
    for name in _entries_except(config_path, (BACKUP_DIR,)):
        path = os.path.join(config_path, name)
        if is_managed(path):
            _remove(path)
    for name in _entries_except(backup, ()):
        # an entry added since the install stays; the older copy comes back beside it
        target = _free_name(config_path, name)
        os.replace(os.path.join(backup, name), target)
    os.rmdir(backup)
    logger.info("restored containerd registry config", extra={"path": config_path})
    return True


def configure_main(cfg: MirrorConfig) -> int:
    """`spegla configuration`: 0 when written; 1 with one error log line when it could not be
    (a bad value is a ConfigError, reported by the CLI as a usage error, exit 2)."""
    try:
        configure(cfg)
    except (OSError, UnicodeError) as exc:
        logger.error(
            "could not write containerd configuration",
            extra={"path": cfg.config_path, "error": str(exc)},
        )
        return 1
    logger.info(
        "containerd reads these files only with this registry config_path (one directory) and "
        "layers kept after unpacking; restart containerd after changing its config",
        extra={
            "config_path": cfg.config_path,
            "containerd_2x_config": snippets.spegla_settings(3, cfg.config_path),
            "containerd_1x_config": snippets.spegla_settings(2, cfg.config_path),
        },
    )
    return 0


def cleanup_main(config_path: str, addr: Any = None) -> int:
    """`spegla cleanup`: restore, then (with `--addr`) answer 200 until SIGTERM (cleanup-wait)."""
    try:
        cleanup(config_path)
    except OSError as exc:
        logger.error("could not restore containerd configuration", extra={"error": str(exc)})
        return 1
    if addr is None:
        return 0
    import trio

    from agent.observability.metrics_server import serve_ok_until_signalled

    trio.run(serve_ok_until_signalled, addr)
    return 0


PROBE_CONCURRENCY = 10
PROBE_TIMEOUT = 1.0


async def _probe_readyz(ip: str, port: int) -> bool:
    """One cleanup pod answers 200 on `/readyz` within PROBE_TIMEOUT."""
    import trio

    from agent.node.bootstrap import http_get

    host = f"[{ip}]" if ":" in ip else ip
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            status, _, _ = await http_get(f"http://{host}:{port}/readyz")
        except Exception:
            return False
        return status == 200
    return False


async def probe_all(
    addrs: Sequence[str],
    port: int,
    probe: Callable[[str, int], Awaitable[bool]] = _probe_readyz,
    concurrency: int = PROBE_CONCURRENCY,
) -> dict[str, bool]:
    """Probe every address, at most `concurrency` at a time; address -> answered 200."""
    import trio

    limiter = trio.CapacityLimiter(concurrency)
    results: dict[str, bool] = {}

    async def one(ip: str) -> None:
        async with limiter:
            results[ip] = await probe(ip, port)

    async with trio.open_nursery() as nursery:
        for ip in dict.fromkeys(addrs):
            nursery.start_soon(one, ip)
    return results


async def _resolve_all(host: str) -> list[str]:
    import socket

    from agent.node.bootstrap import system_lookup

    addrs: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            addrs += await system_lookup(host, family)
        except OSError:
            pass
    return addrs


async def wait_for_cleanup(
    endpoint: Any,
    threshold: int = 3,
    period: float = 2.0,
    *,
    lookup: Callable[[str], Awaitable[list[str]]] = _resolve_all,
    probe: Callable[[str, int], Awaitable[bool]] = _probe_readyz,
    concurrency: int = PROBE_CONCURRENCY,
) -> None:
    """`spegla cleanup-wait`: until `threshold` consecutive rounds saw every address of the
    endpoint's host answer 200 on `/readyz` (1 s per probe, `concurrency` probes at a time); any
    failure, or no address at all, resets the count."""
    import trio

    streak = 0
    while streak < threshold:
        addrs = await lookup(endpoint.host)
        results = await probe_all(addrs, endpoint.port, probe, concurrency) if addrs else {}
        ok = bool(results) and all(results.values())
        streak = streak + 1 if ok else 0
        failing = sorted(ip for ip, good in results.items() if not good)
        logger.info(
            "cleanup probe round",
            extra={"addresses": len(results), "failing": failing[:20], "ok": ok, "streak": streak},
        )
        if streak < threshold:
            await trio.sleep(period)


def cleanup_wait_main(endpoint: Any, threshold: int, period: float) -> int:
    import trio

    trio.run(wait_for_cleanup, endpoint, threshold, period)
    return 0
