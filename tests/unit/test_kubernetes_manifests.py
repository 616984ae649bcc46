"""The Kubernetes manifests in ``deploy/kubernetes/``, checked offline (no cluster runs here).

Every object validates against the Kubernetes API schemas of the versions below
(``kubernetes-validate``, strict: an unknown or misspelt field fails), every shoal
container's command is one ``shoal``'s own parser accepts, and the pieces fit together:
probes on ``/healthz`` at the HTTP port the command serves, the TLS Secret mounted where
``--tls-dir`` points with the keys of the roles the pod runs, resources within limits,
schedulers advertising their pod IP, heads on every etcd member, Services that select pods
with the ports they name.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from shoal.cli import build_parser
from shoal.config import Settings
from shoal.rpc.clients import head_addresses
from shoal.rpc.etcd_client import parse_store_url

pytestmark = pytest.mark.timeout(30)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
KUBERNETES_VERSIONS = ("1.29", "1.34")
"""The oldest Kubernetes the manifests are for (docs/kubernetes.md), and a recent one."""
WORKLOADS = ("StatefulSet", "DaemonSet", "Deployment")
MiB = 2**20

Doc = dict[str, Any]


def _files() -> list[Path]:
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[tuple[str, Doc]]:
    out = []
    for path in _files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return out


DOCS = _documents()


def _workloads() -> list[Doc]:
    return [d for _, d in DOCS if d["kind"] in WORKLOADS]


def _containers() -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container of every workload."""
    for w in _workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
            yield w, c


def _shoal_containers() -> list[tuple[Doc, Doc]]:
    return [(w, c) for w, c in _containers() if c.get("image") == "shoal"]


def _argv(container: Doc) -> list[str]:
    """What the container runs, ``$(VAR)`` expanded as the kubelet does: a variable must be in
    the container's env, else the kubelet would pass ``$(VAR)`` on literally."""
    env = {e["name"] for e in container.get("env", [])}
    argv = [*container["command"], *container.get("args", [])]
    for word in argv:
        for var in re.findall(r"\$\((\w+)\)", word):
            assert var in env, f"container {container['name']}: $({var}) is not in its env"
    return [
        re.sub(r"\$\((\w+)\)", lambda m: f"{m.group(1).lower().replace('_', '-')}-value", w) for w in argv
    ]


def _flag(container: Doc, name: str) -> str | None:
    """The value of ``--name`` (``--name=V`` or ``--name V``) in the container's args, unexpanded."""
    args = container.get("args", [])
    for i, word in enumerate(args):
        if word.startswith(f"--{name}="):
            return str(word.split("=", 1)[1])
        if word == f"--{name}" and i + 1 < len(args):
            return str(args[i + 1])
    return None


def _flags(container: Doc, name: str) -> list[str]:
    return [w.split("=", 1)[1] for w in container.get("args", []) if w.startswith(f"--{name}=")]


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``4``, ``8Gi``, ``512Mi``) as a number."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def _by_kind(kind: str) -> list[Doc]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _one(kind: str, name: str) -> Doc:
    [doc] = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def _env_source(container: Doc, var: str) -> str | None:
    for e in container.get("env", []):
        if e["name"] == var:
            return str(e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"))
    return None


# ---------------------------------------------------------------- schemas


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in _files()]
    assert [i["name"] for i in kustomization["images"]] == ["shoal"]
    assert _shoal_containers(), "no container runs the shoal image"


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[name for name, _ in DOCS])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(
            f"{doc['kind']}/{doc['metadata']['name']} at {'.'.join(map(str, err.path))}: {err.message}"
        )


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    """The validation above is strict: a field Kubernetes does not know is an error."""
    doc = copy.deepcopy(_one("StatefulSet", "shoal-head"))
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)


# ---------------------------------------------------------------- shoal's commands


@pytest.mark.parametrize("container", [c for _, c in _shoal_containers()], ids=lambda c: c["name"])
def test_shoal_accepts_the_container_command(container: Doc, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(container)
    assert argv[0] == "shoal", f"container {container['name']} runs {argv[0]!r}, not shoal"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"shoal refuses {' '.join(argv)}:\n{capsys.readouterr().err}")
    assert args.command == container["name"]
    # SHOAL_* variables name settings and parse as their types.
    env = {e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("SHOAL_")}
    known = {"SHOAL_HEAD"} | {f"SHOAL_{f.upper()}" for f in Settings.__dataclass_fields__}
    assert set(env) <= known, f"unknown settings {set(env) - known}"
    Settings.load(env=env)


@pytest.mark.parametrize("container", [c for _, c in _shoal_containers()], ids=lambda c: c["name"])
def test_probes_ask_healthz_on_the_http_port(container: Doc) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    http_port = int(_flag(container, "http-port") or 0)
    assert http_port, "--http-port is given, so the probes' port is the one served"
    scheme = "HTTPS" if _flag(container, "tls-dir") else "HTTP"
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports[get["port"]] == http_port
        assert get["scheme"] == scheme


@pytest.mark.parametrize(
    ("workload", "container"), _shoal_containers(), ids=[c["name"] for _, c in _shoal_containers()]
)
def test_tls_secret_is_the_tls_dir_with_the_roles_keys(workload: Doc, container: Doc) -> None:
    tls_dir = _flag(container, "tls-dir")
    assert tls_dir, "shoal listens beyond loopback: it needs --tls-dir"
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == tls_dir]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    files = {i["path"] for i in secret["items"]}
    roles = {"head": ["head", "client"], "scheduler": ["scheduler", "replica"]}[container["name"]]
    assert files == {"ca.crt"} | {f"{r}.{ext}" for r in roles for ext in ("crt", "key")}
    assert "ca.key" not in {i["key"] for i in secret["items"]}


# ---------------------------------------------------------------- resources and topology


def test_every_container_has_requests_and_limits() -> None:
    for workload, container in _containers():
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                f"{workload['metadata']['name']}/{container['name']}: no {kind}"
            )
            for value in resources[kind].values():
                assert _quantity(value) > 0


def test_scheduler_offers_replicas_less_than_its_container_limits() -> None:
    """A container sees the node's CPUs and memory, so the scheduler is told what it has."""
    scheduler = _one("DaemonSet", "shoal-scheduler")["spec"]["template"]["spec"]["containers"][0]
    limits = scheduler["resources"]["limits"]
    cpus, memory_mb, gpus = (_flag(scheduler, n) for n in ("cpus", "memory-mb", "gpus"))
    assert cpus is not None and memory_mb is not None and gpus is not None
    assert 0 < float(cpus) < _quantity(limits["cpu"])
    assert 0 < float(memory_mb) * MiB < _quantity(limits["memory"])
    assert float(gpus) == _quantity(limits.get("nvidia.com/gpu", 0))


def test_scheduler_advertises_its_pod_ip_and_keeps_its_node_name() -> None:
    scheduler = _one("DaemonSet", "shoal-scheduler")["spec"]["template"]["spec"]["containers"][0]
    advertise = _flag(scheduler, "advertise-host") or ""
    [var] = re.fullmatch(r"\$\((\w+)\)", advertise).groups()  # type: ignore[union-attr]
    assert _env_source(scheduler, var) == "status.podIP"
    [var] = re.fullmatch(r"\$\((\w+)\)", _flag(scheduler, "scheduler-id") or "").groups()  # type: ignore[union-attr]
    assert _env_source(scheduler, var) == "spec.nodeName"


def test_heads_stand_by_on_etcd_and_schedulers_know_every_head() -> None:
    etcd = _one("StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3
    heads = _one("StatefulSet", "shoal-head")
    assert heads["spec"]["replicas"] == 2
    head = heads["spec"]["template"]["spec"]["containers"][0]
    # --store names a Service over the etcd members' client port, which shoal can parse.
    [(host, port)] = parse_store_url(_flag(head, "store") or "")
    service = _one("Service", host)
    assert service["spec"]["selector"].items() <= etcd["spec"]["template"]["metadata"]["labels"].items()
    [client] = [p for p in service["spec"]["ports"] if p["port"] == port]
    etcd_ports = {
        p["name"]: p["containerPort"] for p in etcd["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert etcd_ports[client["targetPort"]] == 2379

    head_service = heads["spec"]["serviceName"]
    assert _one("Service", head_service)["spec"]["clusterIP"] == "None"
    head_port = _flag(head, "port")
    advertise = _flag(head, "advertise-host")
    assert advertise == f"$(POD_NAME).{head_service}" and _env_source(head, "POD_NAME") == "metadata.name"
    scheduler = _one("DaemonSet", "shoal-scheduler")["spec"]["template"]["spec"]["containers"][0]
    names = [f"shoal-head-{i}.{head_service}:{head_port}" for i in range(heads["spec"]["replicas"])]
    assert _flag(scheduler, "head") == ",".join(names)
    assert head_addresses(_flag(scheduler, "head") or "") == names
    allowed = {c["name"]: _flags(c, "allow-model-dir") for _, c in _shoal_containers()}
    assert allowed["head"] == allowed["scheduler"], "the head checks specs against the schedulers' folders"


def test_services_select_pods_that_have_their_ports() -> None:
    pods = [w["spec"]["template"] for w in _workloads()]
    for service in _by_kind("Service"):
        selector = service["spec"]["selector"]
        [pod] = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        names = {port["name"] for c in pod["spec"]["containers"] for port in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {service['metadata']['name']}: {port['targetPort']}"
    for workload in _workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_model_folders_are_in_the_schedulers_pods() -> None:
    """Each ``--allow-model-dir`` exists where replicas load models: a volume of the scheduler's
    pod, or a folder deploy/Dockerfile copies. (A head that does not see a folder checks only
    what needs no files: docs/security.md.)"""
    copied = re.findall(r"^COPY \S+ (/\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    scheduler = _one("DaemonSet", "shoal-scheduler")["spec"]["template"]["spec"]["containers"][0]
    mounted = [m["mountPath"] for m in scheduler["volumeMounts"]]
    folders = _flags(scheduler, "allow-model-dir")
    assert folders, "schedulers should restrict where model code comes from"
    for folder in folders:
        assert folder in mounted + copied, f"{folder} is not in the scheduler's pod"


def test_pods_meet_the_restricted_pod_security_standard_but_the_models_hostpath() -> None:
    """Kubernetes' ``restricted`` Pod Security level, field by field; the schedulers' model
    folder on the node (a ``hostPath``) is the one exception, and docs/kubernetes.md says so."""
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, name
            assert not c["securityContext"].get("privileged"), name
        host_paths = [v["name"] for v in pod.get("volumes", []) if "hostPath" in v]
        assert host_paths == (["models"] if name == "shoal-scheduler" else []), name
