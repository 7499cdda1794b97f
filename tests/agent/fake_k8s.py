"""A small Kubernetes API server (Quart-Trio) for Lease objects, for tests with the real client.

Supports GET/POST/PUT of `coordination.k8s.io/v1` Leases with resourceVersion checks (409 Conflict
on a stale update, 409 AlreadyExists on a second create). Several `FakeApiServer` fronts can share
one `LeaseStore`; setting `down` on a front makes it answer 503, which cuts one client off the API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

PREFIX = "/apis/coordination.k8s.io/v1/namespaces/<ns>/leases"


@dataclass
class LeaseStore:
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    version: int = 100
    writes: list[tuple[str, str]] = field(default_factory=list)  # (verb, holder)

    def next_version(self) -> str:
        self.version += 1
        return str(self.version)


def _status(code: int, reason: str, message: str) -> Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return Response(json.dumps(body), status=code, content_type="application/json")


class FakeApiServer:
    def __init__(self, store: LeaseStore) -> None:
        self.store = store
        self.down = False
        self.requests = 0
        self.app = self._build()

    def _build(self) -> QuartTrio:
        app = QuartTrio("fake-k8s")
        store = self.store

        @app.before_request
        async def gate() -> Response | None:
            self.requests += 1
            if self.down:
                return _status(503, "ServiceUnavailable", "api server unavailable")
            return None

        @app.route(PREFIX + "/<name>", methods=["GET"])
        async def get(ns: str, name: str) -> Response:
            lease = store.leases.get((ns, name))
            if lease is None:
                return _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
            return Response(json.dumps(lease), content_type="application/json")

        @app.route(PREFIX, methods=["POST"])
        async def create(ns: str) -> Response:
            body = await request.get_json(force=True)
            name = body["metadata"]["name"]
            if (ns, name) in store.leases:
                return _status(409, "AlreadyExists", f'leases "{name}" already exists')
            return self._store(ns, name, body, "create", 201)

        @app.route(PREFIX + "/<name>", methods=["PUT"])
        async def replace(ns: str, name: str) -> Response:
            body = await request.get_json(force=True)
            current = store.leases.get((ns, name))
            if current is None:
                return _status(404, "NotFound", f'leases "{name}" not found')
            sent = body.get("metadata", {}).get("resourceVersion")
            if sent != current["metadata"]["resourceVersion"]:
                return _status(409, "Conflict", "the object has been modified")
            return self._store(ns, name, body, "update", 200)

        return app

    def _store(self, ns: str, name: str, body: dict[str, Any], verb: str, code: int) -> Response:
        body = dict(body)
        body["apiVersion"] = "coordination.k8s.io/v1"
        body["kind"] = "Lease"
        meta = dict(body.get("metadata") or {})
        meta.update(name=name, namespace=ns, resourceVersion=self.store.next_version())
        body["metadata"] = meta
        self.store.leases[(ns, name)] = body
        self.store.writes.append((verb, (body.get("spec") or {}).get("holderIdentity") or ""))
        return Response(json.dumps(body), status=code, content_type="application/json")
