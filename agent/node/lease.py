"""Leader election on a `coordination.k8s.io/v1` Lease, with the official (sync) kubernetes client.

Why our own elector: `kubernetes.leaderelection` is thread-based and hard to cancel. Here the
decision ("may I take or renew the lease?") is a pure function (`decide`) and `LeaseElector` is a
small Trio loop: every API call runs in a worker thread (`trio.to_thread.run_sync`, abandoned on
cancel) under a dedicated `CapacityLimiter`, with an explicit request timeout and no client-side
retries (the timing comes from our loop: 10 s lease, 5 s renew deadline, 2 s retry, like Spegel's
old kubernetes bootstrap). Expiry is judged on our own clock from when we last saw the record
change, not from the holder's `renewTime`, so clock skew between nodes does not matter.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ElectionTiming:
    lease_duration: float = 10.0
    renew_deadline: float = 5.0
    retry_period: float = 2.0
    request_timeout: tuple[float, float] = (2.0, 3.0)  # connect, read


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What matters of a Lease object for the election."""

    holder: str
    renew_time: str  # as the server returned it; compared for change only
    transitions: int
    resource_version: str


@dataclass(frozen=True, slots=True)
class Observation:
    """The last distinct record we saw, and when (our monotonic clock)."""

    record: LeaseRecord
    seen_at: float


@dataclass(frozen=True, slots=True)
class Decision:
    """`take` True: write ourselves as holder (`transition` if someone else held it before)."""

    take: bool
    transition: bool
    leader: str  # who leads according to what we read ("" if nobody)


def observe(previous: Observation | None, record: LeaseRecord, now: float) -> Observation:
    """Keep the old timestamp while the record is unchanged (holder and renew time)."""
    if previous is not None and (previous.record.holder, previous.record.renew_time) == (
        record.holder,
        record.renew_time,
    ):
        return Observation(record, previous.seen_at)
    return Observation(record, now)


def decide(observation: Observation, me: str, now: float, lease_duration: float) -> Decision:
    """May `me` write the lease? Yes if we hold it, it is free, or it was not renewed in time."""
    holder = observation.record.holder
    if holder == me:
        return Decision(take=True, transition=False, leader=me)
    if not holder:
        return Decision(take=True, transition=True, leader="")
    if now - observation.seen_at >= lease_duration:
        return Decision(take=True, transition=True, leader=holder)
    return Decision(take=False, transition=False, leader=holder)


def _record(lease: Any) -> LeaseRecord:
    spec = lease.spec
    renew = getattr(spec, "renew_time", None) if spec is not None else None
    return LeaseRecord(
        holder=(getattr(spec, "holder_identity", None) or "") if spec is not None else "",
        renew_time=renew.isoformat() if renew is not None else "",
        transitions=(getattr(spec, "lease_transitions", None) or 0) if spec is not None else 0,
        resource_version=lease.metadata.resource_version or "",
    )


def make_api_client(kubeconfig: str = "", host: str = "") -> Any:
    """An ApiClient from a kubeconfig, in-cluster config, or a bare host (tests); retries off."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if host:
        cfg.host = host
    elif kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.retries = 0  # our loop retries; urllib3's would multiply the request timeout
    cfg.client_go_retries = False
    return client.ApiClient(cfg)


class LeaseElector:
    """Competes for one Lease; `leader` is the current holder's identity as far as we know."""

    def __init__(
        self,
        api_client: Any,
        name: str,
        namespace: str,
        identity: str,
        timing: ElectionTiming = ElectionTiming(),
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        from kubernetes import client

        self._api = client.CoordinationV1Api(api_client)
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.timing = timing
        self._limiter = limiter or trio.CapacityLimiter(2)
        self._observation: Observation | None = None
        self.leader: str = ""
        self.is_leader = False
        self._changed = trio.Event()

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        kwargs.setdefault("_request_timeout", self.timing.request_timeout)
        call = functools.partial(fn, *args, **kwargs)
        return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self._limiter)

    def _set_leader(self, leader: str) -> None:
        self.is_leader = leader == self.identity
        if leader != self.leader:
            logger.info(
                "lease leader changed",
                extra={"lease": self.name, "leader": leader, "me": self.identity},
            )
            self.leader = leader
            self._changed.set()
            self._changed = trio.Event()

    def _leading(self) -> bool:
        return self.is_leader

    async def wait_leader(self) -> str:
        """Return the leader's identity, waiting until one is known."""
        while not self.leader:
            await self._changed.wait()
        return self.leader

    def _new_lease(self, transitions: int, resource_version: str | None) -> Any:
        from kubernetes import client

        now = _dt.datetime.now(_dt.UTC)
        return client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=self.name, namespace=self.namespace, resource_version=resource_version
            ),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=round(self.timing.lease_duration),
                acquire_time=now,
                renew_time=now,
                lease_transitions=transitions,
            ),
        )

    async def try_acquire_or_renew(self) -> bool:
        """One election step; True when we hold the lease afterwards."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = await self._call(self._api.read_namespaced_lease, self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                await self._call(
                    self._api.create_namespaced_lease,
                    self.namespace,
                    self._new_lease(0, None),
                    _content_type="application/json",
                )
            except ApiException as create_exc:
                if create_exc.status == 409:  # someone else created it first
                    return False
                raise
            self._observation = None
            self._set_leader(self.identity)
            return True
        now = trio.current_time()
        record = _record(lease)
        self._observation = observe(self._observation, record, now)
        decision = decide(self._observation, self.identity, now, self.timing.lease_duration)
        if not decision.take:
            self._set_leader(decision.leader)
            return False
        transitions = record.transitions + (1 if decision.transition and record.holder else 0)
        body = self._new_lease(transitions, record.resource_version)
        if not decision.transition and lease.spec is not None and lease.spec.acquire_time:
            body.spec.acquire_time = lease.spec.acquire_time
        try:
            await self._call(
                self._api.replace_namespaced_lease,
                self.name,
                self.namespace,
                body,
                _content_type="application/json",
            )
        except ApiException as exc:
            if exc.status == 409:  # the record changed under us (resourceVersion conflict)
                return False
            raise
        self._set_leader(self.identity)
        return True

    async def _step(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except Exception as exc:  # API down, timeouts, bad responses: try again next period
            logger.warning("lease step failed", extra={"lease": self.name, "error": repr(exc)})
            return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Elect forever: follow until the lease is ours, then renew; give it up on cancellation."""
        task_status.started()
        try:
            while True:
                if not self.is_leader:
                    await self._step()
                    await trio.sleep(self.timing.retry_period)
                    continue
                # Leading: renew each retry period; lose the lease after renew_deadline without one.
                last_renew = trio.current_time()
                while True:
                    await trio.sleep(self.timing.retry_period)
                    with trio.move_on_after(self.timing.renew_deadline):
                        if await self._step():
                            last_renew = trio.current_time()
                    if not self._leading():
                        break  # someone else took the lease (409 or newer holder seen)
                    if trio.current_time() - last_renew >= self.timing.renew_deadline:
                        logger.warning(
                            "lost lease: renew deadline passed", extra={"lease": self.name}
                        )
                        self._set_leader("")
                        break
        finally:
            if self.is_leader:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await self._release()

    async def _release(self) -> None:
        """Clear the holder so another node takes over now instead of when the lease expires."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = await self._call(self._api.read_namespaced_lease, self.name, self.namespace)
            spec = lease.spec
            if spec is None or (spec.holder_identity or "") != self.identity:
                return
            spec.holder_identity = ""
            spec.renew_time = _dt.datetime.now(_dt.UTC)
            await self._call(
                self._api.replace_namespaced_lease,
                self.name,
                self.namespace,
                lease,
                _content_type="application/json",
            )
            logger.info("released lease", extra={"lease": self.name})
        except (ApiException, OSError, Exception) as exc:
            logger.warning("could not release lease", extra={"error": repr(exc)})
        finally:
            self.is_leader = False
