"""The deployment files agree with the Kubernetes schema, with each other and with the code.

- every manifest in ``deploy/kubernetes/`` validates (strict: unknown fields are errors) against
  the Kubernetes OpenAPI schemas bundled with ``kubernetes-validate`` (offline) for the oldest and
  newest Kubernetes versions this project states (``KUBERNETES_VERSIONS``), and a manifest with a
  wrong field or type is rejected (the validator can fail);
- ``kustomization.yaml`` lists every manifest, and ``kubectl kustomize`` renders it (when kubectl
  is installed: it works offline);
- every cxrnode container's effective configuration (ConfigMap TOML + the container's
  environment + its arguments, read by the node's own ``load_config`` and CLI parser) is valid, and
  its probes' port is the health port it was given, its DICOM port the one the Service targets;
- ``deploy/compose.yaml`` validates against the Compose specification's schema (vendored in
  ``check-jsonschema``), references only services and volumes it defines, and its cxrnode
  services' environment is a valid configuration;
- ``Containerfile`` / ``Containerfile.gpu``: EXPOSE, ENV and HEALTHCHECK name the ports the code
  uses (node.port's default, the image's health port), the user is not root, every package of
  pyproject is copied in.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dicom_node.cli import config_from_args
from dicom_node.config import SECTIONS, Config, NodeConfig
from installer.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose.yaml"
CONTAINERFILES = [ROOT / "Containerfile", ROOT / "Containerfile.gpu"]
# the oldest Kubernetes release still in common support when this was written and the newest the
# validator bundles; the manifests use nothing newer than 1.31 (ttlSecondsAfterFinished: 1.23,
# emptyDir sizeLimit: 1.22, seccompProfile: 1.19)
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
DUMMY_DATABASE_URL = "postgresql+psycopg://cxrnode:secret@db.example.invalid/cxrnode"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc:
                out.append((f"{path.name}#{i}", doc))
    return out


DOCS = documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


# -- the Kubernetes schema ---------------------------------------------------------------------


def test_manifests_exist() -> None:
    kinds = sorted({d["kind"] for _, d in DOCS})
    assert kinds == ["ConfigMap", "Deployment", "Job", "Namespace", "PersistentVolumeClaim", "Secret", "Service"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", DOCS, ids=[n for n, _ in DOCS])
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def _worker() -> dict[str, Any]:
    return next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "cxrnode-worker")


@pytest.mark.parametrize("mutate,why", [
    (lambda d: d["spec"].__setitem__("replica", 2), "a misspelt field (strict)"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].__setitem__("containerPort", "eighty"),
     "a port that is not a number"),
    (lambda d: d["spec"].pop("selector"), "a Deployment without its required selector"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"].__setitem__("paht", "/x"),
     "a misspelt probe field"),
])
def test_validator_rejects_a_wrong_manifest(mutate: Any, why: str) -> None:
    doc = copy.deepcopy(_worker())
    kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kust["resources"]) == [p.name for p in manifest_files()]
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for _, d in DOCS} == {kust["namespace"]}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the rendering check only)")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len([d for d in yaml.safe_load_all(r.stdout) if d]) == len(DOCS)


# -- the manifests agree with each other and with the code -------------------------------------


def configmap_toml(tmp_path: Path) -> Path:
    (cm,) = by_kind("ConfigMap")
    path = tmp_path / "cxrnode.toml"
    path.write_text(cm["data"]["cxrnode.toml"], encoding="utf-8")
    return path


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the node sees it: secrets stand in as a dummy value."""
    secrets = {(s["metadata"]["name"], k) for s in by_kind("Secret") for k in s.get("stringData", {})}
    env = {}
    for e in container.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) in secrets, f"{e['name']}: no secret {ref}"
            env[e["name"]] = DUMMY_DATABASE_URL
        else:
            env[e["name"]] = str(e["value"])
    return env


def effective_config(args: list[str], env: dict[str, str], config_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Config]:
    """What ``cxrnode <args>`` in that container loads: the real CLI parser and config loader."""
    for name in [n for n in os.environ if n.startswith("CXRNODE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if not name.startswith("CXRNODE_"):
            continue  # PATH, PYTHONUNBUFFERED, NVIDIA_*
        assert name == "CXRNODE_CONFIG" or name.removeprefix("CXRNODE_").lower().partition("_")[0] in SECTIONS, \
            f"{name}: not a configuration variable (CXRNODE_<SECTION>_<KEY>)"
        monkeypatch.setenv(name, value)
    parsed = build_parser().parse_args([*args, "--config", str(config_path)])
    return parsed, config_from_args(parsed)


def pod_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) of every Deployment and Job."""
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"], c)
            for d in by_kind("Deployment") + by_kind("Job") for c in d["spec"]["template"]["spec"]["containers"]]


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
    return int(number)


@pytest.mark.parametrize("workload,pod,container", pod_containers(), ids=[w for w, _, _ in pod_containers()])
def test_containers_config_probes_and_security(workload: str, pod: dict[str, Any], container: dict[str, Any],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = container["args"]
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert "/etc/cxrnode/cxrnode.toml" in mounts, "the ConfigMap is where the image looks (CXRNODE_CONFIG)"
    parsed, config = effective_config(args, container_env(container), configmap_toml(tmp_path), monkeypatch)
    assert config.node.database_url == DUMMY_DATABASE_URL
    if parsed.command == "migrate":
        assert "livenessProbe" not in container
    else:
        assert parsed.command in ("serve", "worker")
        health = config.node.health_port
        assert health > 0 and config.node.health_host == "0.0.0.0", "probes come from outside the pod"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz"
            assert port_number(container, get["port"]) == health, f"{probe} is not on the health port {health}"
        annotations = next(d for d in by_kind("Deployment")
                           if d["metadata"]["name"] == workload)["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == health
        assert mounts["/var/lib/cxrnode"]["name"] in {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert config.node.storage_dir == "/var/lib/cxrnode"
    if parsed.command == "serve":
        assert config.jobs.workers == 0, "the SCP pod drafts nothing; the worker pods do"
        assert port_number(container, "dicom") == config.node.port
    if parsed.command == "worker":
        assert parsed.threads == config.model.threads == 1
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # non-root, no privileges, bounded
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert "memory" in container["resources"]["limits"] and "cpu" in container["resources"]["requests"]


def test_service_reaches_the_scp_dicom_port() -> None:
    (svc,) = by_kind("Service")
    (scp,) = [d for d in by_kind("Deployment") if d["spec"]["replicas"] == 1]
    labels = scp["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (container,) = scp["spec"]["template"]["spec"]["containers"]
    (port,) = svc["spec"]["ports"]
    assert port["protocol"] == "TCP" and port_number(container, port["targetPort"]) == NodeConfig().port
    assert scp["spec"]["strategy"]["type"] == "Recreate", "never two SCPs with the same host id at once"
    pvc = by_kind("PersistentVolumeClaim")[0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# -- compose -----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # anchors and merge keys resolved


def test_compose_validates_against_the_compose_spec() -> None:
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_validator_rejects_a_wrong_file(tmp_path: Path) -> None:
    bad = compose()
    bad["services"]["scp"]["depends_on"]["migrate"]["condition"] = "service_finished"  # not a condition
    bad["services"]["worker-1"]["restart_policy"] = "always"  # not a service field
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(bad), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "service_finished" in r.stdout + r.stderr, r.stdout + r.stderr


def test_compose_references_only_what_it_defines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = compose()
    services, volumes = c["services"], set(c.get("volumes") or {})
    assert {"postgres", "migrate", "scp", "worker-1", "worker-2"} <= set(services)
    used_volumes = set()
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services and dep != name, f"{name} depends on {dep!r}, which is not defined"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} mounts {source!r}, which is not defined"
                used_volumes.add(source)
    assert used_volumes == volumes, "a volume is defined but unused"
    # the receiver and both workers share one storage volume
    data = {svc["volumes"][0] for n, svc in services.items() if n in ("scp", "worker-1", "worker-2")}
    assert data == {"cxrnode-data:/var/lib/cxrnode"}

    image_env = containerfile_env(parse_containerfile(CONTAINERFILES[0]))
    empty = tmp_path / "empty.toml"
    empty.write_text("", encoding="utf-8")
    host_ids = set()
    for name in ("migrate", "scp", "worker-1", "worker-2"):
        svc = services[name]
        env = {**image_env, **{k: _interpolate(str(v)) for k, v in svc["environment"].items()}}
        env.pop("CXRNODE_CONFIG", None)
        parsed, config = effective_config(svc["command"], env, empty, monkeypatch)
        assert config.node.database_url.startswith("postgresql+psycopg://") and "@postgres:" in config.node.database_url
        assert config.node.storage_dir == "/var/lib/cxrnode"
        if name == "scp":
            assert parsed.command == "serve" and config.jobs.workers == 0
            assert svc["ports"] == [f"{config.node.port}:{config.node.port}"]
        if name.startswith("worker"):
            assert parsed.command == "worker"
        if name != "migrate":
            host_ids.add(config.node.host_id)
            assert config.node.health_port == healthcheck_port(parse_containerfile(CONTAINERFILES[0]))
    assert len(host_ids) == 3 and "" not in host_ids, "every host needs its own host id (spool folder)"


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the default (the variables are not set here)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


# -- Containerfiles ----------------------------------------------------------------------------


def parse_containerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def containerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    final_stage = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    for word, rest in instructions[final_stage:]:
        if word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def healthcheck_port(instructions: list[tuple[str, str]]) -> int:
    (check,) = [rest for w, rest in instructions if w == "HEALTHCHECK"]
    m = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", check)
    assert m, check
    return int(m.group(1))


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.name)
def test_containerfile_ports_healthcheck_user(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ins = parse_containerfile(path)
    env = containerfile_env(ins)
    exposed = {int(p.split("/")[0]) for w, rest in ins if w == "EXPOSE" for p in rest.split()}
    health = healthcheck_port(ins)
    # what `cxrnode serve` in this image loads: the image's environment over an empty config file
    env.pop("CXRNODE_CONFIG")
    empty = tmp_path / "empty.toml"
    empty.write_text("", encoding="utf-8")
    _, config = effective_config(["serve"], {k: v for k, v in env.items() if k.startswith("CXRNODE_")}, empty,
                                 monkeypatch)
    assert exposed == {config.node.port, health} and config.node.port == NodeConfig().port == 11112
    assert config.node.health_port == health and config.node.health_host == "0.0.0.0"
    assert config.node.storage_dir == "/var/lib/cxrnode" and ("VOLUME", '["/var/lib/cxrnode"]') in ins
    # ONNX Runtime's SQLite cache (~/.cache; HOME is the shared volume) stays in the container
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")
    (user,) = [rest for w, rest in ins if w == "USER"]
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit(), "numeric non-root user"
    assert ("ENTRYPOINT", '["cxrnode"]') in ins
    assert "healthz" in next(rest for w, rest in ins if w == "HEALTHCHECK")
    # every package pyproject ships is copied into the build
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {rest.split()[0] for w, rest in ins if w == "COPY" and "--from" not in rest}
    assert {p.rstrip("*") for p in include} <= copied
    for needed in ("pyproject.toml", "README.md", "LICENSE"):
        assert any(needed in rest for w, rest in ins if w == "COPY")
    extra = "gpu" if path.name.endswith(".gpu") else "cpu"
    assert f"[{extra}]" in " ".join(rest for w, rest in ins if w == "RUN")
    if extra == "gpu":
        run = " ".join(rest for w, rest in ins if w == "RUN")
        assert "onnxruntime-gpu[cuda,cudnn]" in run and "ldconfig" in run
        assert next(rest for w, rest in ins if w == "ARG").startswith("CUDA_IMAGE=docker.io/nvidia/cuda:")


def test_containerignore_keeps_what_the_build_copies() -> None:
    for name in (".containerignore", ".dockerignore"):
        ignored = {ln.strip() for ln in (ROOT / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")}
        assert not ignored & {"pyproject.toml", "README.md", "LICENSE", "dicom_node", "onnx_models", "plugin",
                              "gui", "installer", "cxrnode"}
        assert {".git", "tests"} <= ignored
