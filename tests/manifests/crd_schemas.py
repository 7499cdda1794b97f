"""Hand-written JSON schemas for the part of the prometheus-operator CRDs that manifests/ uses.

Why: kubernetes-validate ships schemas for built-in kinds only; for ServiceMonitor and
PrometheusRule it just warns and passes. These schemas cover the fields we use (names, types and
patterns taken from the monitoring.coreos.com/v1 CRDs) and reject any other field, so a typo such as
`intervall` fails the tests. They are a subset, not the real CRD: a field that exists upstream
but is not listed here is refused too.
"""

from __future__ import annotations

from typing import Any

# The CRDs' Duration pattern (monitoring.coreos.com/v1 `Duration`).
_DURATION = {
    "type": "string",
    "pattern": (
        r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
    ),
}
_LABEL_NAME = {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _strict(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required or [],
        "additionalProperties": False,
    }


_METADATA = _strict(
    {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    ["name", "namespace"],
)

_RELABEL = _strict(
    {
        "sourceLabels": {"type": "array", "items": _LABEL_NAME},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                "replace",
                "keep",
                "drop",
                "keepequal",
                "dropequal",
                "hashmod",
                "labelmap",
                "labeldrop",
                "labelkeep",
                "lowercase",
                "uppercase",
            ],
        },
    }
)

SERVICE_MONITOR = _strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": _strict(
            {
                "jobLabel": {"type": "string"},
                "namespaceSelector": _strict(
                    {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    }
                ),
                "selector": _strict({"matchLabels": _STRING_MAP}),
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        }
                    ),
                },
            },
            ["selector", "endpoints"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

_RULE = _strict(
    {
        "alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
        "record": {"type": "string"},
        "expr": {"type": "string", "minLength": 1},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    ["expr"],
)

PROMETHEUS_RULE = _strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": _strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

# API group -> (apiVersion, kind) -> schema
CRD_SCHEMAS: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
    "monitoring.coreos.com": {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
        ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    }
}
