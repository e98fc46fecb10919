"""The Kubernetes manifests of deploy/kubernetes, rendered as a user renders them.

Every overlay is rendered with ``kubectl kustomize`` and validated strictly and
offline (kubernetes-validate) for the oldest Kubernetes the manifests support
(1.29, native sidecars on by default) and the newest the validator knows; then
the rendered objects are checked for what a schema cannot see: the sidecar is
a native sidecar probed over grpc.health.v1, every container runs under the
restricted Pod Security profile, the ports agree with the daemon's config,
selectors select. Each check is also run against a deliberately broken copy of
the manifests, to show it catches what it is for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sidecar.auth import check_exposure
from sidecar.config import SidecarConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())
# 1.29: the first release with native sidecars on by default.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
# Custom resources: no schema ships with the validator; test_servicemonitor
# checks the one we use against the Service it scrapes.
CRD_KINDS = {"ServiceMonitor"}
SIDECAR = "atlas-sidecar"
Obj = dict[str, Any]


def kustomize(path: Path) -> list[Obj]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/kubernetes")
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RenderError(out.stderr.strip())
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class RenderError(Exception):
    pass


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return kustomize(KUBE / "overlays" / request.param)


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o["kind"] in ("Deployment", "StatefulSet"))


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def sidecar_of(spec: Obj) -> Obj | None:
    return next((c for c in spec.get("initContainers", []) if c["name"] == SIDECAR), None)


def config_of(objs: list[Obj], tmp_path: Path) -> SidecarConfig:
    (cm,) = [
        o
        for o in objs
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("atlas-sidecar-config")
    ]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_config(path, environ={})


def port_of(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- the checks: each returns what is wrong, so a broken copy can show it -----


def schema_problems(objs: list[Obj], version: str) -> list[str]:
    problems = []
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    return problems


def sidecar_problems(objs: list[Obj]) -> list[str]:
    problems = []
    for w in workloads(objs):
        name = w["metadata"]["name"]
        spec = pod_spec(w)
        side = sidecar_of(spec)
        if side is None:
            problems.append(f"{name}: no {SIDECAR} init container")
            continue
        if spec["initContainers"][0]["name"] != SIDECAR:
            problems.append(f"{name}: {SIDECAR} is not the first init container")
        if side.get("restartPolicy") != "Always":
            problems.append(f"{name}: {SIDECAR} lacks restartPolicy: Always (not a sidecar)")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc = side.get(probe, {}).get("grpc")
            if grpc is None:
                problems.append(f"{name}: {probe} is not a gRPC probe")
            elif grpc.get("service", "") != "":
                problems.append(f"{name}: {probe} asks for a service the daemon does not report")
        res = side.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(kind, {})):
                problems.append(f"{name}: {SIDECAR} lacks {kind} for cpu and memory")
    return problems


def security_problems(objs: list[Obj]) -> list[str]:
    problems = []
    for w in workloads(objs):
        spec = pod_spec(w)
        pod_sc = spec.get("securityContext", {})
        for c in containers(spec):
            where = f"{w['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not set")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities do not drop ALL")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            ours = c.get("image") == SIDECAR or c["name"] == SIDECAR
            if ours and sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: the sidecar image's root is not read-only")
    return problems


def port_problems(objs: list[Obj], config: SidecarConfig) -> list[str]:
    """The ports, paths and grace period of the pods against the daemon's config."""
    problems = []
    grpc_port = port_of(config.server.listen[0])
    metrics_port = port_of(config.server.metrics_listen)
    for w in workloads(objs):
        name = w["metadata"]["name"]
        spec = pod_spec(w)
        side = sidecar_of(spec)
        if side is None:
            continue
        ports = {p["name"]: p["containerPort"] for p in side.get("ports", [])}
        if ports.get("grpc") != grpc_port:
            problems.append(f"{name}: container port grpc is not server.listen's {grpc_port}")
        if ports.get("metrics") != metrics_port:
            problems.append(f"{name}: container port metrics is not {metrics_port}")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = side.get(probe, {}).get("grpc", {}).get("port")
            if port != grpc_port:
                problems.append(f"{name}: {probe} probes {port}, the daemon listens on {grpc_port}")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= config.server.grace_seconds:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} <= grace_seconds")
        mounts = {m["mountPath"]: m["name"] for m in side.get("volumeMounts", [])}
        args = side.get("args", [])
        config_path = Path(args[args.index("--config") + 1])
        if mounts.get(str(config_path.parent)) != "atlas-sidecar-config":
            problems.append(f"{name}: --config {config_path} is not on the config volume")
        tokens = config.auth.tokens_file
        if tokens is None or mounts.get(str(tokens.parent)) != "atlas-sidecar-tokens":
            problems.append(f"{name}: auth.tokens_file {tokens} is not on the tokens volume")
        data_mount = next((p for p, v in mounts.items() if v == "atlas-sidecar-data"), None)
        if data_mount is None or not config.store.data_dir.is_relative_to(data_mount):
            problems.append(f"{name}: store.data_dir {config.store.data_dir} is not on its volume")
    for svc in (o for o in objs if o["kind"] == "Service"):
        for p in svc["spec"].get("ports", []):
            if p["name"] == "metrics" and p.get("targetPort") not in ("metrics", metrics_port):
                problems.append(f"Service/{svc['metadata']['name']}: metrics targets {p}")
    return problems


def selector_problems(objs: list[Obj]) -> list[str]:
    problems = []
    pods = [w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads(objs)]
    for w in workloads(objs):
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        if not selects(w["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"{w['kind']}/{w['metadata']['name']}: selector misses its pods")
    for o in objs:
        selector = None
        if o["kind"] == "Service":
            selector = o["spec"].get("selector")
        elif o["kind"] == "NetworkPolicy":
            selector = o["spec"]["podSelector"].get("matchLabels")
        if selector is not None and not any(selects(selector, p) for p in pods):
            problems.append(f"{o['kind']}/{o['metadata']['name']}: selects no pod")
    return problems


# -- every overlay ----------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(rendered: list[Obj], version: str) -> None:
    assert schema_problems(rendered, version) == []
    assert {o["kind"] for o in rendered} - CRD_KINDS, "rendered nothing but custom resources"


def test_sidecar_is_native_and_probed_over_grpc_health(rendered: list[Obj]) -> None:
    assert list(workloads(rendered)), "the overlay has no workload"
    assert sidecar_problems(rendered) == []


def test_every_container_runs_restricted(rendered: list[Obj]) -> None:
    assert security_problems(rendered) == []


def test_ports_and_paths_match_the_config(rendered: list[Obj], tmp_path: Path) -> None:
    config = config_of(rendered, tmp_path)
    assert port_problems(rendered, config) == []
    # With the gRPC port on the pod IP the daemon starts only with auth on.
    listeners = [("server.listen", a) for a in config.server.listen]
    check_exposure(
        listeners, auth_on=config.auth.tokens_file is not None, allow_unauthenticated=False
    )
    assert config.auth.allow_unauthenticated is False


def test_selectors_select(rendered: list[Obj]) -> None:
    assert selector_problems(rendered) == []


def test_secrets_are_mounted_as_docs_security_says(rendered: list[Obj]) -> None:
    for w in workloads(rendered):
        spec = pod_spec(w)
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert secrets["atlas-sidecar-tokens"] == "atlas-sidecar-tokens"
        side = sidecar_of(spec)
        assert side is not None
        (mount,) = [m for m in side["volumeMounts"] if m["name"] == "atlas-sidecar-tokens"]
        assert mount["mountPath"] == "/etc/atlas-sidecar/auth"
        assert "subPath" not in mount, "a subPath mount never sees a rotation"
        # The other containers reach the client token, as env or as a file.
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for c in spec["containers"]
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        ]
        files = [n for n, s in secrets.items() if s == "atlas-sidecar-client-token"]
        assert refs or files
        assert all(r == {"name": "atlas-sidecar-client-token", "key": "token"} for r in refs)


def test_servicemonitor_scrapes_the_metrics_service(rendered: list[Obj]) -> None:
    monitors = [o for o in rendered if o["kind"] == "ServiceMonitor"]
    services = [o for o in rendered if o["kind"] == "Service"]
    for mon in monitors:
        matched = [
            s
            for s in services
            if selects(mon["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert [s["metadata"]["name"] for s in matched] == ["atlas-sidecar-metrics"]
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert {e["port"] for e in mon["spec"]["endpoints"]} <= port_names


# -- what each overlay is for -------------------------------------------------


def test_simple_overlay_keeps_data_on_a_bounded_emptydir() -> None:
    (w,) = workloads(kustomize(KUBE / "overlays" / "simple"))
    (vol,) = [v for v in pod_spec(w)["volumes"] if v["name"] == "atlas-sidecar-data"]
    assert vol["emptyDir"]["sizeLimit"]
    strategy = w["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a failed rollout must leave the old pod serving"


def test_statefulset_overlay_keeps_data_on_a_pvc() -> None:
    (w,) = workloads(kustomize(KUBE / "overlays" / "statefulset"))
    assert w["kind"] == "StatefulSet"
    assert [t["metadata"]["name"] for t in w["spec"]["volumeClaimTemplates"]] == [
        "atlas-sidecar-data"
    ]
    spec = pod_spec(w)
    assert "atlas-sidecar-data" not in {v["name"] for v in spec["volumes"]}
    side = sidecar_of(spec)
    assert side is not None
    assert "ATLAS_SIDECAR__STORE__RETENTION_MAX_EVENTS" not in {
        e["name"] for e in side.get("env", [])
    }
    assert spec["securityContext"]["fsGroup"] == side["securityContext"]["runAsGroup"]


@pytest.mark.parametrize(
    ("overlay", "backend"), [("vllm", "vllm"), ("llama-server", "llama-router")]
)
def test_gateway_is_the_front_door(overlay: str, backend: str) -> None:
    objs = kustomize(KUBE / "overlays" / overlay)
    (w,) = workloads(objs)
    spec = pod_spec(w)
    (gw,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    assert gw["args"][0] == "gateway"
    assert f"--backend={backend}" in gw["args"]
    assert "--sidecar=127.0.0.1:50051" in gw["args"]
    env = {e["name"]: e.get("value") for e in gw["env"]}
    token_file = Path(env["ATLAS_SIDECAR__GATEWAY__TOKEN_FILE"])
    mounts = {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}
    (client,) = [v for v in spec["volumes"] if v["name"] == mounts[str(token_file.parent)]]
    assert client["secret"]["secretName"] == "atlas-sidecar-client-token"
    assert token_file.name == "token"
    gw_port = next(p["containerPort"] for p in gw["ports"] if p["name"] == "http")
    assert port_of(next(a for a in gw["args"] if a.startswith("--listen="))) == gw_port
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == overlay]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    # The front door's policy opens the gateway's port and nothing else.
    (policy,) = [
        o for o in objs if o["kind"] == "NetworkPolicy" and "gateway" in o["metadata"]["name"]
    ]
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == ["http"]
    assert spec["terminationGracePeriodSeconds"] > 45, "the server's drain comes first"


def test_base_policy_admits_only_the_pod_and_the_scraper() -> None:
    objs = kustomize(KUBE / "overlays" / "simple")
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own, scraper = policy["spec"]["ingress"]
    assert own["from"] == [{"podSelector": policy["spec"]["podSelector"]}]
    assert "ports" not in own
    assert [p["port"] for p in scraper["ports"]] == ["metrics"]


# -- the component on a user's own workloads ----------------------------------

USER_APP = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: my-server}
spec:
  selector: {matchLabels: {app: my-server}}
  template:
    metadata: {labels: {app: my-server}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
        - name: server
          image: example/server:1
          env: [{name: MODE, value: prod}]
"""


def adopt(tmp_path: Path, app: str, extra: str = "") -> list[Obj]:
    (tmp_path / "app.yaml").write_text(app)
    rel = os.path.relpath(KUBE / "components" / "sidecar", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [app.yaml]\ncomponents: [{rel}]\n{extra}"
    )
    return kustomize(tmp_path)


def test_component_adds_the_sidecar_to_an_existing_deployment(tmp_path: Path) -> None:
    objs = adopt(tmp_path, USER_APP)
    (w,) = workloads(objs)
    spec = pod_spec(w)
    assert spec["containers"] == yaml.safe_load(USER_APP)["spec"]["template"]["spec"]["containers"]
    assert sidecar_problems(objs) == []
    assert w["spec"]["selector"]["matchLabels"] == {"app": "my-server"}, "selector untouched"
    labels = w["spec"]["template"]["metadata"]["labels"]
    assert labels == {"app": "my-server", "atlas-sidecar/sidecar": "enabled"}
    # The generated ConfigMap's hashed name is what the pod mounts.
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "atlas-sidecar-config"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"] != "atlas-sidecar-config"
    assert selector_problems(objs) == []
    for version in K8S_VERSIONS:
        assert schema_problems(objs, version) == []


def test_a_users_patch_after_the_component_wins(tmp_path: Path) -> None:
    patch = (
        "patches:\n  - target: {kind: Deployment, name: my-server}\n    patch: |-\n"
        "      - {op: replace, path: /spec/template/spec/terminationGracePeriodSeconds, value: 120}\n"
    )
    (w,) = workloads(adopt(tmp_path, USER_APP, patch))
    assert pod_spec(w)["terminationGracePeriodSeconds"] == 120


def test_render_sets_the_image_and_the_namespace() -> None:
    env = {**os.environ, "IMAGE": "registry.invalid/team/sidecar:9.9", "NAMESPACE": "ml-prod"}
    for overlay in OVERLAYS:
        out = subprocess.run(
            [str(ROOT / "scripts" / "deploy.sh"), "render"],
            env={**env, "OVERLAY": overlay},
            capture_output=True,
            text=True,
            check=True,
        )
        objs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert {o["metadata"].get("namespace") for o in objs} == {"ml-prod"}
        ours = [
            c["image"]
            for w in workloads(objs)
            for c in containers(pod_spec(w))
            if c["name"] in (SIDECAR, "gateway", "server", "presets")
        ]
        assert ours and set(ours) == {"registry.invalid/team/sidecar:9.9"}


# -- broken copies: each check catches what it is for -------------------------


@pytest.fixture
def broken_copy(tmp_path: Path) -> Callable[[str, Callable[[str], str]], list[Obj]]:
    """Copies deploy/kubernetes, edits one file with ``edit``, renders the simple overlay."""
    shutil.copytree(KUBE, tmp_path / "kubernetes")

    def make(relpath: str, edit: Callable[[str], str]) -> list[Obj]:
        path = tmp_path / "kubernetes" / relpath
        before = path.read_text()
        after = edit(before)
        assert after != before, "the edit changed nothing"
        path.write_text(after)
        return kustomize(tmp_path / "kubernetes" / "overlays" / "simple")

    return make


def test_a_typo_in_a_field_is_caught(broken_copy: Any) -> None:
    objs = broken_copy(
        "components/sidecar/sidecar.yaml", lambda s: s.replace("readinessProbe:", "readinesProbe:")
    )
    for version in K8S_VERSIONS:
        problems = schema_problems(objs, version)
        assert len(problems) == 1 and "readinesProbe" in problems[0], problems


def test_a_wrong_type_is_caught(broken_copy: Any) -> None:
    objs = broken_copy(
        "overlays/simple/deployment.yaml", lambda s: s.replace("replicas: 1", "replicas: one")
    )
    assert schema_problems(objs, K8S_VERSIONS[0])


def test_a_sidecar_without_restart_policy_always_is_caught(broken_copy: Any) -> None:
    objs = broken_copy(
        "components/sidecar/sidecar.yaml",
        lambda s: s.replace("          restartPolicy: Always\n", ""),
    )
    # Valid to the schema (a plain init container) but never a sidecar: it
    # would block the pod's start forever.
    assert schema_problems(objs, K8S_VERSIONS[0]) == []
    assert sidecar_problems(objs) == [
        f"atlas-sidecar-demo: {SIDECAR} lacks restartPolicy: Always (not a sidecar)"
    ]


def test_a_probe_that_is_not_grpc_is_caught(broken_copy: Any) -> None:
    def to_tcp(s: str) -> str:
        head, tail = s.split("livenessProbe:\n            grpc:", 1)
        return head + "livenessProbe:\n            tcpSocket:" + tail

    objs = broken_copy("components/sidecar/sidecar.yaml", to_tcp)
    assert sidecar_problems(objs) == ["atlas-sidecar-demo: livenessProbe is not a gRPC probe"]


def test_a_selector_that_does_not_match_is_caught(broken_copy: Any) -> None:
    def typo(s: str) -> str:
        head, tail = s.split("matchLabels:\n      app.kubernetes.io/name: atlas-sidecar-demo", 1)
        return head + "matchLabels:\n      app.kubernetes.io/name: atlas-sidecar-dmeo" + tail

    objs = broken_copy("overlays/simple/deployment.yaml", typo)
    assert schema_problems(objs, K8S_VERSIONS[0]) == []
    assert selector_problems(objs) == ["Deployment/atlas-sidecar-demo: selector misses its pods"]


def test_a_service_selecting_nothing_is_caught(broken_copy: Any) -> None:
    objs = broken_copy(
        "base/service-metrics.yaml",
        lambda s: s.replace("atlas-sidecar/sidecar: enabled", "atlas-sidecar/sidecar: on"),
    )
    assert selector_problems(objs) == ["Service/atlas-sidecar-metrics: selects no pod"]


def test_a_port_drifting_from_the_config_is_caught(broken_copy: Any, tmp_path: Path) -> None:
    objs = broken_copy("base/config.yaml", lambda s: s.replace('"0.0.0.0:9465"', '"0.0.0.0:9466"'))
    problems = port_problems(objs, config_of(objs, tmp_path))
    assert problems == ["atlas-sidecar-demo: container port metrics is not 9466"]


def test_a_root_container_is_caught(broken_copy: Any) -> None:
    def as_root(s: str) -> str:
        s = s.replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", 1)
        return s.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", 1)

    objs = broken_copy("components/sidecar/sidecar.yaml", as_root)
    assert sorted(security_problems(objs)) == [
        "atlas-sidecar-demo/atlas-sidecar: allowPrivilegeEscalation is not false",
        "atlas-sidecar-demo/atlas-sidecar: the sidecar image's root is not read-only",
    ]


def test_a_grace_period_under_the_daemons_is_caught(broken_copy: Any, tmp_path: Path) -> None:
    objs = broken_copy(
        "components/sidecar/sidecar.yaml",
        lambda s: s.replace(
            "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 5"
        ),
    )
    assert port_problems(objs, config_of(objs, tmp_path)) == [
        "atlas-sidecar-demo: terminationGracePeriodSeconds 5 <= grace_seconds"
    ]
