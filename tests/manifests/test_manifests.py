"""Offline checks of what `kubectl apply -k manifests/` installs, in every documented variant.

Why these checks: users apply the manifests to real clusters, so what they get must be right the
first time. Each variant (base, each component, both, the cleanup kustomization) is rendered, every
object is validated with kubernetes-validate in strict mode for every Kubernetes minor version the
README claims, and every flag and env twin the manifests hand to `spegla` goes through the agent's
own parser. prometheus-operator CRDs have no schema in kubernetes-validate (it only warns and passes
them), so they are checked against a hand-written subset of their CRD schemas (crd_schemas.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions

from agent.cli.main import build_parser
from agent.config import parse_duration
from tests.manifests.crd_schemas import CRD_SCHEMAS
from tests.manifests.kustomize_subset import Object, object_id, render

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
COMPONENTS = {
    "dht-psk": MANIFESTS / "components" / "dht-psk",
    "basic-auth": MANIFESTS / "components" / "basic-auth",
    "network-policy": MANIFESTS / "components" / "network-policy",
    "kubernetes-bootstrap": MANIFESTS / "components" / "kubernetes-bootstrap",
    "monitoring": MANIFESTS / "components" / "monitoring",
    "node-port-local": MANIFESTS / "components" / "node-port-local",
}
EXAMPLES = MANIFESTS / "examples"
# Every kustomization a user may apply: a directory, or base + components in a throw-away overlay.
VARIANTS: dict[str, Path | tuple[str, ...]] = {
    "default": MANIFESTS,
    "cleanup": MANIFESTS / "cleanup",
    "all-components": (
        "dht-psk",
        "basic-auth",
        "kubernetes-bootstrap",
        "monitoring",
        "network-policy",
    ),
    "node-port-local": ("node-port-local", "basic-auth"),
    **{f"examples/{d.name}": d for d in sorted(EXAMPLES.iterdir()) if d.is_dir()},
}
# The oldest version the README claims; the newest is whatever kubernetes-validate ships.
OLDEST_SUPPORTED = (1, 30)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def claimed_versions() -> list[str]:
    """One version per minor release from OLDEST_SUPPORTED to the newest kubernetes-validate has."""
    by_minor = {_minor(v): v for v in all_versions() if _minor(v) >= OLDEST_SUPPORTED}
    return [by_minor[key] for key in sorted(by_minor)]


def _write_overlay(directory: Path, components: tuple[str, ...]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS / "base", directory)],
    }
    if components:
        overlay["components"] = [os.path.relpath(COMPONENTS[c], directory) for c in components]
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return directory


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("overlays")
    dirs = {}
    for name, where in VARIANTS.items():
        dirs[name] = where if isinstance(where, Path) else _write_overlay(base / name, where)
    return dirs


@pytest.fixture(scope="module")
def rendered(variant_dirs: dict[str, Path]) -> dict[str, list[Object]]:
    return {name: render(path) for name, path in variant_dirs.items()}


def _by_id(objects: list[Object]) -> dict[tuple[str, str, str], Object]:
    return {object_id(obj): obj for obj in objects}


def _one(objects: list[Object], kind: str, name: str) -> Object:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# --- rendering ------------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not installed: subset not cross-checked"
)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_subset_renders_what_kubectl_kustomize_renders(
    variant: str, variant_dirs: dict[str, Path], rendered: dict[str, list[Object]]
) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(variant_dirs[variant])],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    expected = _by_id([doc for doc in yaml.safe_load_all(out) if doc])
    assert _by_id(rendered[variant]) == expected


def test_base_installs_the_documented_objects(rendered: dict[str, list[Object]]) -> None:
    ids = {(kind, name) for kind, _, name in _by_id(rendered["default"])}
    assert ids == {
        ("Namespace", "spegla"),
        ("ServiceAccount", "spegla"),
        ("ConfigMap", "spegla-agent"),
        ("Service", "spegla-bootstrap"),
        ("Service", "spegla-metrics"),
        ("Service", "spegla-registry"),
        ("DaemonSet", "spegla"),
    }
    # Leases are needed only by the kubernetes bootstrap: no RBAC at all in the default install.
    rbac = ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    assert not [o for o in rendered["default"] if o["kind"] in rbac]
    for obj in rendered["default"]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "spegla", object_id(obj)


def init_container(pod: Object, name: str = "configuration") -> Object:
    """An init container by name (containerd-check runs before configuration)."""
    found = [c for c in pod["initContainers"] if c["name"] == name]
    assert len(found) == 1, f"expected one init container {name}"
    return found[0]


def _host_paths(objects: list[Object], daemonset: str) -> dict[str, str]:
    pod = _one(objects, "DaemonSet", daemonset)["spec"]["template"]["spec"]
    return {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}


def test_distribution_examples_move_only_the_host_paths_they_mean_to(
    rendered: dict[str, list[Object]],
) -> None:
    default = _host_paths(rendered["default"], "spegla")
    expected = {
        "examples/talos": {
            "containerd-certs-d": "/etc/cri/conf.d/hosts",
            "containerd-etc": "/etc/cri",
        },
        "examples/k0s": {
            "containerd-sock": "/run/k0s",
            "containerd-content": "/var/lib/k0s/containerd/io.containerd.content.v1.content",
            "containerd-etc": "/etc/k0s",
        },
    }
    for example, changes in expected.items():
        assert _host_paths(rendered[example], "spegla") == {**default, **changes}, example
    cleanup = _host_paths(rendered["examples/talos-cleanup"], "spegla-cleanup")
    assert cleanup == {"containerd-certs-d": "/etc/cri/conf.d/hosts"}


def test_cleanup_namespace_is_the_same_object(rendered: dict[str, list[Object]]) -> None:
    cleanup = _one(rendered["cleanup"], "Namespace", "spegla")
    assert cleanup == _one(rendered["default"], "Namespace", "spegla")


# --- schema validation ----------------------------------------------------------------------------


def _validation_cases() -> list[Any]:
    return [
        pytest.param(version, variant, id=f"{version}-{variant}")
        for version in claimed_versions()
        for variant in sorted(VARIANTS)
    ]


def test_claimed_versions_cover_oldest_and_newest() -> None:
    versions = claimed_versions()
    assert _minor(versions[0]) == OLDEST_SUPPORTED
    assert versions[-1] == all_versions()[-1]
    assert (MANIFESTS.parent / "README.md").read_text().count(
        f"Kubernetes {OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]}"
    ) >= 1, "README must name the oldest Kubernetes version the tests validate against"


@pytest.mark.parametrize(("version", "variant"), _validation_cases())
def test_objects_validate_strictly(
    version: str, variant: str, rendered: dict[str, list[Object]]
) -> None:
    for obj in rendered[variant]:
        api_group = obj["apiVersion"].split("/")[0]
        if api_group in CRD_SCHEMAS:
            # kubernetes-validate has no schema for CRDs: make sure it still says so (its CLI would
            # only warn and pass); test_crds_match_the_used_subset_of_their_schemas checks them.
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{object_id(obj)} invalid for Kubernetes {version}: {path}: {exc.message}")


def test_crds_match_the_used_subset_of_their_schemas(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["all-components"]
    crds = [obj for obj in objects if obj["apiVersion"].split("/")[0] in CRD_SCHEMAS]
    assert {obj["kind"] for obj in crds} == {"ServiceMonitor", "PrometheusRule"}
    for obj in crds:
        schema = CRD_SCHEMAS[obj["apiVersion"].split("/")[0]][(obj["apiVersion"], obj["kind"])]
        jsonschema.validate(obj, schema)


def test_crd_subset_schemas_reject_typos() -> None:
    schema = CRD_SCHEMAS["monitoring.coreos.com"][("monitoring.coreos.com/v1", "ServiceMonitor")]
    bad = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x", "namespace": "spegla"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "30s"}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# --- the DaemonSet --------------------------------------------------------------------------------


def test_daemonset_is_safe_on_every_node(rendered: dict[str, list[Object]]) -> None:
    ds = _one(rendered["default"], "DaemonSet", "spegla")
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"operator": "Exists", "effect": "NoExecute"} in pod["tolerations"]
    assert pod["automountServiceAccountToken"] is False
    containers = pod["initContainers"] + pod["containers"]
    for container in containers:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
    registry = pod["containers"][0]
    assert registry["startupProbe"]["httpGet"]["path"] == "/livez"
    assert registry["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert registry["livenessProbe"]["httpGet"]["path"] == "/livez"
    mounts = {m["name"]: m for m in registry["volumeMounts"]}
    assert mounts["containerd-content"].get("readOnly") is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    # a hostPath type the kubelet checks would keep the pod in ContainerCreating, before
    # containerd-check could say what is wrong (k3s: no /run/containerd)
    for volume in volumes.values():
        assert volume.get("hostPath", {}).get("type", "DirectoryOrCreate") == "DirectoryOrCreate"
    assert {"containerd-sock", "containerd-content", "containerd-certs-d", "data"} <= set(volumes)


@pytest.mark.parametrize(
    "variant",
    sorted(
        v
        for v in set(VARIANTS) - {"cleanup", "examples/talos-cleanup"}
        if "node-port-local" not in v  # no host port there: test_install.py
    ),
)
def test_containerd_is_pointed_at_the_local_agent_through_its_host_port(
    variant: str, rendered: dict[str, list[Object]]
) -> None:
    pod = _one(rendered[variant], "DaemonSet", "spegla")["spec"]["template"]["spec"]
    registry_port = next(p for p in pod["containers"][0]["ports"] if p["name"] == "registry")
    targets = [a for a in init_container(pod)["args"] if a.startswith("--mirror-targets=")]
    service = _one(rendered[variant], "Service", "spegla-registry")["spec"]["ports"][0]
    assert targets == [
        f"--mirror-targets=http://$(NODE_IP):{registry_port['hostPort']},"
        f"http://$(NODE_IP):{service['nodePort']}"
    ]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    if variant != "examples/host-port":  # (that example patches the init container only)
        assert env["MIRROR_TARGETS"] == targets[0].removeprefix("--mirror-targets=")
    init_env = {e["name"]: e for e in init_container(pod)["env"]}
    assert init_env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    if variant == "examples/host-port":
        assert registry_port["hostPort"] != 30020


def test_registry_service_is_the_second_mirror_and_reaches_every_agent(
    rendered: dict[str, list[Object]],
) -> None:
    """The NodePort Service after the host port: any ready agent of the cluster answers on it."""
    objects = rendered["default"]
    spec = _one(objects, "Service", "spegla-registry")["spec"]
    template = _one(objects, "DaemonSet", "spegla")["spec"]["template"]
    assert spec["type"] == "NodePort" and spec.get("externalTrafficPolicy") == "Cluster"
    assert spec["selector"].items() <= template["metadata"]["labels"].items()
    (port,) = spec["ports"]
    named = {p["name"]: p for p in template["spec"]["containers"][0]["ports"]}
    assert port["targetPort"] == "registry" and named["registry"]["protocol"] == port["protocol"]
    assert port["nodePort"] != named["registry"]["hostPort"]
    # running transfers finish on SIGTERM: the agent waits for them, bounded by the pod's grace
    assert template["spec"]["terminationGracePeriodSeconds"] >= 60
    args = template["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--shutdown-grace")]


def test_basic_auth_component_mounts_the_secret_where_both_containers_read_it(
    rendered: dict[str, list[Object]],
) -> None:
    from registry.auth.basic import DEFAULT_DIR

    objects = rendered["all-components"]
    pod = _one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "basic-auth")
    assert volume["secret"]["secretName"] == "spegla-basic-auth"
    for container in (init_container(pod), pod["containers"][0]):
        mount = next(m for m in container["volumeMounts"] if m["name"] == "basic-auth")
        assert mount["mountPath"] == DEFAULT_DIR and mount["readOnly"] is True
        assert not [a for a in container["args"] if a.startswith("--basic-auth-dir")]
    assert not [
        v
        for v in _one(rendered["default"], "DaemonSet", "spegla")["spec"]["template"]["spec"][
            "volumes"
        ]
        if v["name"] == "basic-auth"
    ]
    text = (COMPONENTS["basic-auth"] / "kustomization.yaml").read_text()
    assert "create secret generic spegla-basic-auth" in text


def test_bootstrap_service_publishes_not_ready_agents(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["default"]
    service = _one(objects, "Service", "spegla-bootstrap")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = _one(objects, "DaemonSet", "spegla")["spec"]["template"]["metadata"]["labels"]
    for name in ("spegla-bootstrap", "spegla-metrics"):
        selector = _one(objects, "Service", name)["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), name
    config = _one(objects, "ConfigMap", "spegla-agent")["data"]
    assert config["DNS_BOOTSTRAP_DOMAIN"].startswith("spegla-bootstrap.spegla.svc.")


def test_the_default_install_mounts_the_cluster_key_where_the_agent_reads_it(
    rendered: dict[str, list[Object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered["default"]
    key_file = _one(objects, "ConfigMap", "spegla-agent")["data"]["CLUSTER_KEY_FILE"]
    pod = _one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "cluster-key")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "cluster-key")
    assert key_file == f"{mount['mountPath']}/key" == "/etc/spegla/cluster-key/key"
    assert mount["readOnly"] is True
    # the init container reads it too: without a key hosts.toml gets capability pull only
    configuration = next(c for c in pod["initContainers"] if c["name"] == "configuration")
    init = next(m for m in configuration["volumeMounts"] if m["name"] == "cluster-key")
    assert init == mount
    # optional: the agents start before the Secret exists (and then say they have no key)
    assert volume["secret"] == {
        "secretName": "spegla-cluster-key",
        "optional": True,
        "defaultMode": 0o400,
    }
    text = (MANIFESTS / "base" / "daemonset.yaml").read_text()
    assert "create secret generic spegla-cluster-key --from-literal=key=" in text
    # the agent reads it: CLUSTER_KEY_FILE is the env twin of --cluster-key-file
    ns = _parse(monkeypatch, ["registry"], {"CLUSTER_KEY_FILE": key_file})
    assert ns.cluster_key_file == key_file


def test_dht_psk_component_keeps_an_older_installs_secret(
    rendered: dict[str, list[Object]],
) -> None:
    objects = rendered["all-components"]
    pod = _one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"]
    volumes = [v for v in pod["volumes"] if v["name"] == "cluster-key"]
    assert len(volumes) == 1
    assert volumes[0]["secret"]["secretName"] == "spegla-dht-psk"
    assert volumes[0]["secret"]["optional"] is True
    data = _one(objects, "ConfigMap", "spegla-agent")["data"]
    assert data["CLUSTER_KEY_FILE"] == "/etc/spegla/cluster-key/key" and "DHT_PSK_FILE" not in data


def test_network_policy_names_ports_the_agent_has(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["all-components"]
    policy = _one(objects, "NetworkPolicy", "spegla")
    template = _one(objects, "DaemonSet", "spegla")["spec"]["template"]
    ports = {(p["name"], p["protocol"]) for p in template["spec"]["containers"][0]["ports"]}
    rules = policy["spec"]["ingress"]
    named = {(p["port"], p["protocol"]) for rule in rules for p in rule["ports"]}
    assert named == ports
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()


def test_kubernetes_bootstrap_component_grants_leases_only(
    rendered: dict[str, list[Object]],
) -> None:
    objects = rendered["examples/kubernetes-bootstrap"]
    role = _one(objects, "Role", "spegla-leader-election")
    assert [(r["apiGroups"], r["resources"]) for r in role["rules"]] == [
        (["coordination.k8s.io"], ["leases"])
    ]
    binding = _one(objects, "RoleBinding", "spegla-leader-election")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "spegla", "namespace": "spegla"}
    ]
    assert _one(objects, "ServiceAccount", "spegla")["automountServiceAccountToken"] is True
    pod = _one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert _one(objects, "ConfigMap", "spegla-agent")["data"]["BOOTSTRAP_KIND"] == "kubernetes"


# --- flags and env twins against the agent's parser -----------------------------------------------

# What the kubelet would put into fieldRef-sourced variables, on IPv4 and on IPv6 nodes.
FIELD_VALUES = {
    "ipv4": {"status.hostIP": "10.0.0.11", "status.podIP": "10.244.1.5", "spec.nodeName": "node-a"},
    "ipv6": {"status.hostIP": "fd00::11", "status.podIP": "fd00:10::5", "spec.nodeName": "node-a"},
}
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _container_env(
    container: Object, objects: list[Object], family: str = "ipv4"
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = FIELD_VALUES[family][var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args; an unknown variable would reach the agent verbatim."""

    def replace(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"{arg}: $({match.group(1)}) is not defined in the container"
        return env[match.group(1)]

    return _VAR_REF.sub(replace, arg)


def _spegla_containers(objects: list[Object]) -> Iterator[tuple[str, Object]]:
    for obj in objects:
        if obj["kind"] != "DaemonSet":
            continue
        pod = obj["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            # containerd-check runs a shell in the same image (test_install.py runs its script)
            if "/spegla:" in container["image"] and container["name"] != "containerd-check":
                yield f"{obj['metadata']['name']}/{container['name']}", container


def _parse(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]) -> Any:
    with monkeypatch.context() as patch:
        for key in list(os.environ):
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        return build_parser().parse_args(args)


def _option_strings(command: str) -> set[str]:
    """The exact option names of a subcommand (argparse would also accept unique abbreviations)."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices[command]._option_string_actions)
    raise AssertionError("spegla's parser has no subcommands")


def _cross_check(ns: Any) -> None:
    """Run the agent's own cross-field checks if it has them (a bootstrap kind needs its flags)."""
    import agent.cli.main as cli

    check = {"registry": "registry_config", "configuration": "mirror_config"}.get(ns.command)
    if check and hasattr(cli, check):
        getattr(cli, check)(ns)


@pytest.mark.parametrize("family", sorted(FIELD_VALUES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_flag_the_manifests_pass_is_accepted(
    variant: str, family: str, rendered: dict[str, list[Object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[variant]
    containers = list(_spegla_containers(objects))
    assert containers, "no spegla container found"
    for where, container in containers:
        assert "command" not in container, f"{where}: the image's entrypoint is spegla, use args"
        env = _container_env(container, objects, family)
        args = [_expand(arg, env) for arg in container["args"]]
        known = _option_strings(args[0])
        for arg in args[1:]:
            if arg.startswith("-"):
                assert arg.split("=", 1)[0] in known, f"{where}: {arg} is not a flag of {args[0]}"
        try:
            ns = _parse(monkeypatch, args, env)
            _cross_check(ns)
        except SystemExit as exc:
            pytest.fail(f"{where}: spegla {' '.join(args)} rejected (exit {exc.code})")
        except ValueError as exc:
            pytest.fail(f"{where}: spegla {' '.join(args)}: {exc}")


# A value different from the default for every env twin the ConfigMap sets (or documents in
# comments): setting it must change what the parser returns, proving the agent reads that variable.
ENV_PROBES = {
    "LOG_LEVEL": "DEBUG",
    "BOOTSTRAP_KIND": "static",
    "DNS_BOOTSTRAP_DOMAIN": "probe.example.internal",
    "MIRROR_RESOLVE_TIMEOUT": "35ms",
    "MIRROR_RESOLVE_RETRIES": "7",
    "RESOLVE_TAGS": "false",
    "PREPEND_EXISTING": "true",
    "DEBUG_WEB_ENABLED": "false",
    "MIRRORED_REGISTRIES": "https://probe.example.com",
    "REGISTRY_FILTERS": ":probe$",
    "CLUSTER_KEY_FILE": "/probe/key",
}
# Keys the ConfigMap only documents in comments, with the subcommands that must honour them.
DOCUMENTED_KEYS = {
    "MIRRORED_REGISTRIES": ("registry", "configuration"),
    "REGISTRY_FILTERS": ("registry",),
}


def _honoured(monkeypatch: pytest.MonkeyPatch, args: list[str], key: str) -> bool:
    baseline = vars(_parse(monkeypatch, args, {}))
    probed = vars(_parse(monkeypatch, args, {key: ENV_PROBES[key]}))
    return bool(baseline != probed)


def test_configmap_keys_are_env_twins_the_agent_reads(
    rendered: dict[str, list[Object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered["all-components"]
    data = _one(objects, "ConfigMap", "spegla-agent")["data"]
    configmap_text = (MANIFESTS / "base" / "configmap.yaml").read_text()
    for key in DOCUMENTED_KEYS:
        assert f"# {key}:" in configmap_text, f"{key} is no longer documented in configmap.yaml"
    missing = set(data) - set(ENV_PROBES)
    assert not missing, f"add probe values for {sorted(missing)}"
    readers = {}
    for _, container in _spegla_containers(objects):
        sources = [ref["configMapRef"]["name"] for ref in container.get("envFrom", [])]
        if "spegla-agent" in sources:
            readers[container["args"][0]] = [container["args"][0]]
    assert set(readers) == {"registry", "configuration"}
    for key in data:
        assert any(_honoured(monkeypatch, args, key) for args in readers.values()), (
            f"{key} is set in the ConfigMap but neither spegla registry nor configuration reads it"
        )
    for key, commands in DOCUMENTED_KEYS.items():
        for command in commands:
            assert _honoured(monkeypatch, readers[command], key), f"spegla {command} ignores {key}"


# --- monitoring: alerts and dashboard use metrics that exist --------------------------------------

# Metrics from elsewhere: Prometheus itself, prometheus-client's process collector (the agent serves
# the default registry), and kube-state-metrics.
EXTERNAL_METRICS = {"up", "process_start_time_seconds", "kube_pod_container_status_restarts_total"}
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
# `Gauge("name", ...)` objects, and the `GaugeMetricFamily("name", ...)` families of custom
# collectors (agent/observability/dht_metrics.py reads the DHT node's statistics at scrape time).
_DECLARED = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary)(?:MetricFamily)?\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\""
)


def _declared_metrics() -> dict[str, str]:
    """Metric name -> type, from the prometheus-client declarations in the agent's packages."""
    declared = {}
    for package in ("agent", "dht", "registry"):
        for path in (ROOT / package).rglob("*.py"):
            for kind, name in _DECLARED.findall(path.read_text(encoding="utf-8")):
                declared[name.removesuffix("_total")] = kind
    return declared


def _series_exist(name: str, declared: dict[str, str]) -> bool:
    if name in EXTERNAL_METRICS:
        return True
    for suffix, kinds in (
        ("_total", {"Counter"}),
        ("_bucket", {"Histogram"}),
        ("_sum", {"Histogram", "Summary"}),
        ("_count", {"Histogram", "Summary"}),
    ):
        if name.endswith(suffix) and declared.get(name.removesuffix(suffix)) in kinds:
            return True
    return declared.get(name) in ("Gauge", "Histogram", "Summary") and not name.endswith("_total")


def _monitoring_exprs(objects: list[Object]) -> list[str]:
    import json

    rule = _one(objects, "PrometheusRule", "spegla")
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    dashboard = json.loads(
        _one(objects, "ConfigMap", "spegla-grafana-dashboard")["data"]["spegla.json"]
    )
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return exprs


def test_alerts_and_dashboard_use_only_metrics_that_exist(
    rendered: dict[str, list[Object]],
) -> None:
    declared = _declared_metrics()
    assert any(name.startswith("spegel_") for name in declared), "metric scan found no spegel_*"
    exprs = _monitoring_exprs(rendered["examples/with-monitoring"])
    for expr in exprs:
        names = _SELECTOR.findall(expr)
        assert names, f"no metric selector in {expr!r}"
        for name in names:
            assert _series_exist(name, declared), f"{name} (in {expr!r}) is not exported"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_declared_names_include_what_the_dht_collector_exports() -> None:
    """The source scan above must see the custom collector's names, or the check means nothing."""
    from agent.observability.dht_metrics import DhtCollector

    declared = _declared_metrics()
    exported = {(family.name, family.type) for family in DhtCollector().describe()}
    assert exported
    for name, kind in exported:
        assert declared.get(name) == kind.capitalize(), name


def test_no_peers_alert_reads_the_agents_routing_table(rendered: dict[str, list[Object]]) -> None:
    rule = _one(rendered["examples/with-monitoring"], "PrometheusRule", "spegla")
    alert = next(
        r
        for group in rule["spec"]["groups"]
        for r in group["rules"]
        if r.get("alert") == "SpeglaNoPeers"
    )
    assert alert["expr"].strip() == 'spegla_dht_routing_table_size{job="spegla-metrics"} == 0'
    assert alert["for"] == "5m"


def test_alerts_cover_no_peers_misses_and_restarts(rendered: dict[str, list[Object]]) -> None:
    rule = _one(rendered["examples/with-monitoring"], "PrometheusRule", "spegla")
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]}
    assert {"SpeglaNoPeers", "SpeglaHighMissRatio", "SpeglaAgentRestarting"} <= alerts
    monitor = _one(rendered["examples/with-monitoring"], "ServiceMonitor", "spegla")
    service = _one(rendered["examples/with-monitoring"], "Service", "spegla-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    # The rules select the scrape job by the Service's name, which is what prometheus-operator uses.
    assert 'job="spegla-metrics"' in rule["spec"]["groups"][0]["rules"][1]["expr"]


def test_container_ports_are_the_ports_the_agent_listens_on(
    rendered: dict[str, list[Object]],
) -> None:
    pod = _one(rendered["default"], "DaemonSet", "spegla")["spec"]["template"]["spec"]
    registry = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in registry["ports"]}
    flags = dict(arg.split("=", 1) for arg in registry["args"][1:] if arg.startswith("--"))
    for flag, port_name in (
        ("--registry-addr", "registry"),
        ("--router-addr", "router"),
        ("--metrics-addr", "metrics"),
    ):
        assert flags[flag] == f":{ports[port_name]}", flag
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert registry[probe]["httpGet"]["port"] == "registry", probe
    # The agent waits for running transfers as long as they take (like Spegel) unless the
    # manifests bound it; then the bound must fit inside the kubelet's grace period.
    grace = _parse_duration_default("--shutdown-grace")
    set_here = [a for a in registry["args"] if a.startswith("--shutdown-grace=")]
    if set_here:
        grace = parse_duration(set_here[0].partition("=")[2])
        assert pod["terminationGracePeriodSeconds"] > grace
    else:
        assert grace == float("inf")


def _parse_duration_default(flag: str) -> float:
    ns = build_parser().parse_args(["registry"])
    return float(getattr(ns, flag.lstrip("-").replace("-", "_")))
