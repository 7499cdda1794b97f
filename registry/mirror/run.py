"""One mirror request, sequenced: resolve providers, fetch from one, fail over, resume, verify.

Why its own module: the agent-wide parts (`registry.mirror.forwarder`) outlive requests; this is the
per-request driver (its overall bound, its supply of providers, HEAD and manifest answers; a blob
body is `registry.mirror.blob_run`'s).  It reads the agent-wide state only through
`registry.mirror.context.RunContext`.  Its seams live beside it: where the next peer comes from
(a `registry.burst.supply.Supply`), one transfer from one peer (`registry.mirror.peer_transfer`),
what is trusted (`registry.mirror.verification`) and the byte loop of a blob
(`registry.mirror.blob_stream`).

Deadlines, all Trio cancel scopes: each wait for a provider `resolve_timeout` (20 ms), at most
`resolve_retries` failed attempts; connect + response headers `response_timeout`; no body bytes
for `stall_timeout` counts as a broken stream; HEAD and manifests finish within
`manifest_deadline` (3 s) overall; a blob GET has a provider answering (its response head
checked) or its 404 within `request_deadline` (claim waits and busy providers included), then
its body is bounded by the stall bounds, and resumptions end after `resume_patience` without
progress.  A peer answering 404 for a key it advertised (deleted since;
its provider records live on) is skipped for that key for `stale_ttl` (60 s) by later requests
(`mirror.StaleProviders`).

Verification and client ranges: `registry.mirror.verification` says what is trusted and how a
resumed range is verified; this module and `registry.mirror.blob_run` apply it.

Hedging and several peers: a provider that has not answered within the hedge delay gets company
(`registry.mirror.peer_race`); a big blob is fetched as ranges from up to `multi_peer_max`
providers.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, ExitStack

import trio

from registry.burst.attempts import GiveUp
from registry.burst.supply import Supply
from registry.mirror.blob_run import BlobRun
from registry.mirror.peer_transfer import PeerFetch, read_whole_body
from registry.mirror.run_state import RunState
from registry.oci.ranges import RangeNotSatisfiable

__all__ = ["MirrorRun"]


class MirrorRun(RunState):
    """One mirror request, from its first lookup to its last item."""

    async def run(self) -> None:
        bounded = self.is_head or not self.is_blob
        s = self.settings
        deadline = s.manifest_deadline if bounded else s.request_deadline
        with trio.move_on_after(deadline) as overall:
            if not bounded:
                self.decision = overall  # lifted once a provider answers (see `fetch`)
            async with trio.open_nursery() as nursery:
                supply = self.ctx.supply(
                    self.ref.identifier,
                    nursery,
                    claim_digest=self.ref.digest if self.blob_get and self.job.claimable else None,
                    avoid=self.attempts.avoid,
                    client_ip=self.job.client_ip,
                )
                supply.start(nursery)
                try:
                    with ExitStack() as feeds:
                        if self.blob_get and self.ref.digest:
                            self.feed = feeds.enter_context(self.ctx.own.open(self.ref.digest))
                        async with AsyncExitStack() as stack:
                            await self._serve(supply, stack)
                finally:
                    await supply.finish()
                nursery.cancel_scope.cancel()
        if overall.cancelled_caught:
            await self.fail(
                404, f"mirror deadline exceeded for {self.ref.identifier}", self.attempts.failed
            )

    async def _serve(self, supply: Supply, stack: AsyncExitStack) -> None:
        if self.is_head:
            await self._serve_head(supply, stack)
        elif self.is_blob:
            await BlobRun(self).serve(supply, stack)
        else:
            await self._serve_manifest(supply, stack)

    async def _serve_head(self, supply: Supply, stack: AsyncExitStack) -> None:
        fetch = await self.fetch(supply, stack, None, None)
        if isinstance(fetch, GiveUp):
            await self.fail(404, fetch.message, fetch.attempts)
            return
        try:
            delivered = self.blob_range(fetch.answer.size)
        except RangeNotSatisfiable:
            await self.unsatisfiable(fetch.answer.size)
            return
        await self.send_head(self.content_headers(fetch.answer, delivered, fetch.peer))

    async def _serve_manifest(self, supply: Supply, stack: AsyncExitStack) -> None:
        while True:
            fetch = await self.fetch(supply, stack, None, None)
            if isinstance(fetch, GiveUp):
                await self.fail(404, fetch.message, fetch.attempts)
                return
            body = await self._read_manifest(fetch)
            if body is not None:
                await self.send_head(self.content_headers(fetch.answer, None))
                await self.emit(body)
                return
            await stack.aclose()
            give_up = self.attempts.fetch_failed()
            if give_up is not None:
                await self.fail(404, give_up.message, give_up.attempts)
                return

    async def _read_manifest(self, fetch: PeerFetch) -> bytes | None:
        """The peer's verified manifest body, or None (peer failed or lied)."""
        answer = fetch.answer
        if self.verify.manifest_too_big(answer):
            return None
        body = await read_whole_body(fetch, self.settings.stall_timeout)
        if body is None:
            return None
        if not self.verify.manifest_matches(body, answer):
            self.verify.punish(answer.digest, [fetch.peer], self.ref.registry)
            return None
        return body
