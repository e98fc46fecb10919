"""make deploy on a real one-node Kubernetes (make deploy-test; not part of make test).

The cluster is built from the release's own binaries (scripts/build_k8s.sh,
cached), runs in a network namespace with no route out (tests/cluster/_lab.py)
and gets the image of make image (cached by a stamp of its sources) through
containerd's import: no registry anywhere. The tests run in order on one
cluster; the last one tears it down and checks that nothing is left.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster._lab import NODE, PAUSE_IMAGE, LabCluster, LabError

# The fresh build of the Kubernetes binaries and the image falls in the first test's setup.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VERSION = next(
    line.split('"')[1]
    for line in (ROOT / "pyproject.toml").read_text().splitlines()
    if line.startswith("version = ")
)
IMAGE = os.environ.get("IMAGE", f"localhost/atlas-sidecar:{VERSION}")
CONTAINERS_CONF = str(ROOT / "deploy" / "image" / "containers.conf")
SIMPLE_NS = "lab-simple"
PVC_NS = "lab-pvc"
TIMINGS: dict[str, float] = {}
FACTS: dict[str, object] = {}
# Generous bounds on waits for things that must happen; a slow machine is
# not a failure, a condition that never holds is.
WAIT = 240.0


def _timed(name: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    TIMINGS[name] = round(time.monotonic() - t0, 1)
    if out.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _podman(*args: str) -> list[str]:
    return ["env", f"CONTAINERS_CONF={CONTAINERS_CONF}", "podman", *args]


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, mounts and containerd (CI runs as root)")
    bins = Path(
        _timed("kubernetes binaries", [str(ROOT / "scripts" / "build_k8s.sh")]).stdout.split()[-1]
    )
    _timed("image", ["make", "--no-print-directory", "-C", str(ROOT), "image", f"IMAGE={IMAGE}"])
    work = Path(tempfile.mkdtemp(prefix="atlas-lab-"))
    cluster = LabCluster(work, bins / "bin")
    try:
        archives = _image_archives(bins, work)
        t0 = time.monotonic()
        cluster.start()
        for archive in archives:
            cluster.load_image(archive)
        TIMINGS["cluster up"] = round(time.monotonic() - t0, 1)
        yield cluster
    finally:
        cluster.stop()
        leaks = cluster.leaks()
        # The components' logs outlive the cluster, for whoever reads a failure.
        shutil.rmtree(ROOT / "test-artifacts" / "cluster-logs", ignore_errors=True)
        if (work / "logs").is_dir():
            shutil.copytree(work / "logs", ROOT / "test-artifacts" / "cluster-logs")
        cluster.remove_workdir()
        _write_timings()
        assert leaks == [], f"teardown left: {leaks}"


def _image_archives(bins: Path, work: Path) -> list[Path]:
    """docker-archive tarballs of the sidecar image and of a pause image (the release's pause.c)."""
    pause_dir = work / "pause-rootfs"
    pause_dir.mkdir()
    (pause_dir / "pause").write_bytes((bins / "bin" / "pause").read_bytes())
    (pause_dir / "pause").chmod(0o755)
    pause_tar = work / "pause-rootfs.tar"
    subprocess.run(["tar", "-C", str(pause_dir), "-cf", str(pause_tar), "pause"], check=True)
    subprocess.run(
        _podman(
            "import", "--quiet", "--change", 'ENTRYPOINT ["/pause"]', str(pause_tar), PAUSE_IMAGE
        ),
        check=True,
        capture_output=True,
    )
    out = []
    for ref, name in ((PAUSE_IMAGE, "pause.tar"), (IMAGE, "sidecar.tar")):
        path = work / name
        subprocess.run(
            _podman("save", "--quiet", "--format", "docker-archive", "-o", str(path), ref),
            check=True,
            capture_output=True,
        )
        out.append(path)
    return out


def _write_timings() -> None:
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    doc = {"seconds": TIMINGS, "facts": FACTS}
    (artifacts / "deploy-test-timings.json").write_text(json.dumps(doc, indent=2) + "\n")


def make_deploy(lab: LabCluster, overlay: str, namespace: str, *extra: str) -> str:
    t0 = time.monotonic()
    out = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "deploy",
         f"OVERLAY={overlay}", f"NAMESPACE={namespace}", f"IMAGE={IMAGE}", *extra],
        env=lab.env(), capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    TIMINGS[f"make deploy {overlay}"] = round(time.monotonic() - t0, 1)
    if out.returncode != 0:
        pods = lab.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        events = lab.kubectl("-n", namespace, "get", "events", check=False).stdout
        raise AssertionError(
            f"make deploy failed:\n{out.stdout}\n{out.stderr}\n{pods}\n{events[-4000:]}"
        )
    return out.stdout


def wait_for(what: str, cond: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(1)


def pods(lab: LabCluster, ns: str, selector: str) -> list[dict[str, Any]]:
    items = lab.kubectl_json("-n", ns, "get", "pods", "-l", selector)["items"]
    return items  # type: ignore[return-value]


def ready(pod: dict[str, Any]) -> bool:
    conds = pod["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def operator_token(lab: LabCluster, ns: str) -> str:
    secret = lab.kubectl_json("-n", ns, "get", "secret", "atlas-sidecar-operator-token")
    return base64.b64decode(secret["data"]["token"]).decode()  # type: ignore[index]


def status_in(lab: LabCluster, ns: str, pod: str) -> dict[str, Any]:
    out = lab.kubectl(
        "-n", ns, "exec", pod, "-c", "atlas-sidecar", "--",
        "env", f"ATLAS_SIDECAR_TOKEN={operator_token(lab, ns)}", "atlas-sidecar", "status", "--json",
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- every overlay, as the API server sees it ---------------------------------

# The ServiceMonitor's kind, so that the API server accepts it in a dry run;
# its schema is the operator's business (tests/unit checks what we rely on).
SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "kubernetes" / "overlays").iterdir())


def servicemonitor_kind(lab: LabCluster) -> None:
    lab.kubectl("apply", "-f", "-", input=json.dumps(SERVICEMONITOR_CRD))
    lab.kubectl(
        "wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com",
        "--timeout=60s",
    )  # fmt: skip


def test_every_overlay_passes_the_api_servers_strict_dry_run(lab: LabCluster) -> None:
    """What offline schemas miss (semantics, admission): the API server's own checks."""
    servicemonitor_kind(lab)
    lab.kubectl("create", "namespace", "lab-dry-run")
    lab.kubectl(
        "label", "namespace", "lab-dry-run", "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    )  # fmt: skip
    for overlay in OVERLAYS:
        rendered = subprocess.run(
            [str(ROOT / "scripts" / "deploy.sh"), "render"],
            env={**os.environ, "OVERLAY": overlay, "NAMESPACE": "lab-dry-run", "IMAGE": IMAGE},
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        out = lab.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "--server-side",
            "--field-manager=atlas-sidecar-deploy", "-f", "-",
            input=rendered, check=False,
        )  # fmt: skip
        assert out.returncode == 0, f"{overlay}: {out.stderr}"
        # The restricted profile's warnings come on stderr for workloads.
        assert "PodSecurity" not in out.stderr, f"{overlay}: {out.stderr}"
    lab.kubectl("delete", "namespace", "lab-dry-run", "--wait=false")


def test_the_dry_run_catches_what_offline_schemas_miss(lab: LabCluster) -> None:
    rendered = subprocess.run(
        [str(ROOT / "scripts" / "deploy.sh"), "render"],
        env={**os.environ, "OVERLAY": "simple", "NAMESPACE": "default", "IMAGE": IMAGE},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    # A selector that does not match its pods' labels: valid to every schema.
    broken = rendered.replace(
        "      app.kubernetes.io/name: atlas-sidecar-demo\n  strategy:",
        "      app.kubernetes.io/name: atlas-sidecar-dmeo\n  strategy:",
    )
    assert broken != rendered
    out = lab.kubectl("apply", "--dry-run=server", "-f", "-", input=broken, check=False)
    assert out.returncode != 0
    assert "selector" in out.stderr and "does not match template" in out.stderr
    # A container allowed to escalate: the restricted profile's warning, which
    # the dry run of every overlay above must not show.
    lab.kubectl("create", "namespace", "lab-pss")
    lab.kubectl("label", "namespace", "lab-pss", "pod-security.kubernetes.io/warn=restricted")
    escalating = rendered.replace(
        "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", 1
    ).replace("namespace: default", "namespace: lab-pss")
    out = lab.kubectl("apply", "--dry-run=server", "-f", "-", input=escalating, check=False)
    assert "would violate PodSecurity" in out.stderr and "allowPrivilegeEscalation" in out.stderr
    lab.kubectl("delete", "namespace", "lab-pss", "--wait=false")


# -- the simple overlay: rollout, status, metrics, a failed rollout, undo ------


def test_make_deploy_completes_the_rollout(lab: LabCluster) -> None:
    out = make_deploy(lab, "simple", SIMPLE_NS)
    assert "deployment.apps/atlas-sidecar-demo" in out
    (pod,) = pods(lab, SIMPLE_NS, "app.kubernetes.io/name=atlas-sidecar-demo")
    assert ready(pod)
    (side,) = pod["status"]["initContainerStatuses"]
    assert side["name"] == "atlas-sidecar" and side["started"] and side["ready"]
    # The namespace enforces the restricted profile: the pod was admitted under it.
    ns = lab.kubectl_json("get", "namespace", SIMPLE_NS)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"  # type: ignore[index]


def test_status_answers_from_inside_the_pod(lab: LabCluster) -> None:
    (pod,) = pods(lab, SIMPLE_NS, "app.kubernetes.io/name=atlas-sidecar-demo")
    name = pod["metadata"]["name"]
    # The reference server streams events as the client token allows.
    status = wait_for(
        "events from the reference server",
        lambda: (s := status_in(lab, SIMPLE_NS, name)) and _accepted(s) > 0 and s,
    )
    assert _accepted(status) > 0
    # Without a token the daemon refuses (auth is on: the gRPC port is on the pod IP).
    refused = lab.kubectl(
        "-n", SIMPLE_NS, "exec", name, "-c", "atlas-sidecar", "--", "atlas-sidecar", "status",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stderr + refused.stdout


def _accepted(status: dict[str, Any]) -> int:
    return int(status["events"]["accepted"])


def test_metrics_through_the_api_server_proxy(lab: LabCluster) -> None:
    path = f"/api/v1/namespaces/{SIMPLE_NS}/services/atlas-sidecar-metrics:metrics/proxy/metrics"
    text = wait_for(
        "metrics through the proxy",
        lambda: (o := lab.kubectl("get", "--raw", path, check=False)).returncode == 0 and o.stdout,
    )
    assert "atlas_" in text
    # The metrics listener serves /metrics alone: /api is not there.
    api = path.removesuffix("/metrics") + "/api/status"
    assert lab.kubectl("get", "--raw", api, check=False).returncode != 0


def test_a_sidecar_that_cannot_start_blocks_the_rollout_and_undo_restores_it(
    lab: LabCluster,
) -> None:
    selector = "app.kubernetes.io/name=atlas-sidecar-demo"
    (old,) = pods(lab, SIMPLE_NS, selector)
    old_name = old["metadata"]["name"]
    # A config the daemon refuses at start (it exits naming the key).
    lab.kubectl(
        "-n", SIMPLE_NS, "set", "env", "deployment/atlas-sidecar-demo", "-c", "atlas-sidecar",
        "ATLAS_SIDECAR__SERVER__GRACE_SECONDS=-1",
    )  # fmt: skip

    def crashed_new_pod() -> dict[str, Any] | None:
        for p in pods(lab, SIMPLE_NS, selector):
            if p["metadata"]["name"] == old_name:
                continue
            for s in p["status"].get("initContainerStatuses", []):
                term = s.get("lastState", {}).get("terminated") or s["state"].get("terminated")
                if s["name"] == "atlas-sidecar" and term and s["restartCount"] >= 1:
                    return p
        return None

    new = wait_for("the new pod's sidecar failing", crashed_new_pod)
    assert not ready(new)
    # Its main container never started: kubelet waits for the sidecar's startup probe.
    assert all("running" not in s["state"] for s in new["status"].get("containerStatuses", []))

    # The sidecar is crash-looping: a restart can remove the container whose log we
    # asked for, so ask again until the current or the previous one answers.
    def refusal_logged() -> bool:
        for which in (["--previous"], []):
            out = lab.kubectl(
                "-n", SIMPLE_NS, "logs", new["metadata"]["name"], "-c", "atlas-sidecar", *which,
                check=False,
            )  # fmt: skip
            if "grace_seconds" in out.stdout + out.stderr:
                return True
        return False

    wait_for("the sidecar's log naming the refused key", refusal_logged)
    # The rollout is stuck, and the old pod is still ready and serving.
    stuck = lab.kubectl(
        "-n", SIMPLE_NS, "rollout", "status", "deployment/atlas-sidecar-demo", "--timeout=5s",
        check=False,
    )  # fmt: skip
    assert stuck.returncode != 0
    (still,) = [p for p in pods(lab, SIMPLE_NS, selector) if p["metadata"]["name"] == old_name]
    assert ready(still)
    before = _accepted(status_in(lab, SIMPLE_NS, old_name))
    wait_for(
        "the old pod taking events", lambda: _accepted(status_in(lab, SIMPLE_NS, old_name)) > before
    )

    lab.kubectl("-n", SIMPLE_NS, "rollout", "undo", "deployment/atlas-sidecar-demo")
    lab.kubectl(
        "-n", SIMPLE_NS, "rollout", "status", "deployment/atlas-sidecar-demo",
        f"--timeout={int(WAIT)}s", timeout=WAIT + 30,
    )  # fmt: skip
    dep = lab.kubectl_json("-n", SIMPLE_NS, "get", "deployment", "atlas-sidecar-demo")
    side = dep["spec"]["template"]["spec"]["initContainers"][0]  # type: ignore[index]
    assert "ATLAS_SIDECAR__SERVER__GRACE_SECONDS" not in {e["name"] for e in side.get("env", [])}
    wait_for(
        "only the old pod left",
        lambda: [p["metadata"]["name"] for p in pods(lab, SIMPLE_NS, selector)] == [old_name],
    )


# -- the PVC overlay: start order, acked events across a rollout restart ------


def _producer_log(lab: LabCluster, pod: str) -> str:
    return lab.kubectl("-n", PVC_NS, "logs", pod, "-c", "server").stdout


def _local_volume(lab: LabCluster) -> None:
    """A PersistentVolume for the StatefulSet's claim: a folder of the work dir.

    No provisioner runs here; a claim without a class binds to a volume
    without one. A local volume (not hostPath) so that fsGroup applies.
    """
    path = lab.workdir / "pv0"
    path.mkdir()
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": "lab-pv-0"},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [NODE],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    }
    lab.kubectl("apply", "-f", "-", input=json.dumps(pv))


def test_main_container_starts_after_the_sidecars_startup_probe(lab: LabCluster) -> None:
    _local_volume(lab)
    make_deploy(lab, str(HERE / "overlays" / "producer"), PVC_NS)
    pod = lab.kubectl_json("-n", PVC_NS, "get", "pod", "atlas-sidecar-store-0")
    (main,) = pod["status"]["containerStatuses"]  # type: ignore[index]
    (side,) = pod["status"]["initContainerStatuses"]  # type: ignore[index]
    # The producer asks the sidecar's health once, without retrying, as its
    # first act, and exits if it is not SERVING: no restart means the sidecar
    # served before the main container started (its start is 3 s slower here).
    assert main["restartCount"] == 0 and side["restartCount"] == 0
    first = _producer_log(lab, "atlas-sidecar-store-0").splitlines()[0]
    assert json.loads(first) == {"event": "sidecar_at_start", "status": "SERVING"}
    assert side["state"]["running"]["startedAt"] <= main["state"]["running"]["startedAt"]


def test_every_acked_event_survives_a_rollout_restart(lab: LabCluster) -> None:
    pod = "atlas-sidecar-store-0"
    uid = lab.kubectl_json("-n", PVC_NS, "get", "pod", pod)["metadata"]["uid"]  # type: ignore[index]
    wait_for("acks", lambda: _producer_log(lab, pod).count("\nacked ") >= 5)
    # Follow the producer's log to its end: the old pod's last words are the
    # ids it got acked while kubelet stopped it (producer first, sidecar last).
    with tempfile.TemporaryFile(mode="w+") as log:
        follower = subprocess.Popen(
            [*lab.nsenter, "kubectl", f"--kubeconfig={lab.kubeconfig}", "-n", PVC_NS,
             "logs", "-f", pod, "-c", "server"],
            stdout=log, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            lab.kubectl("-n", PVC_NS, "rollout", "restart", "statefulset/atlas-sidecar-store")
            lab.kubectl(
                "-n", PVC_NS, "rollout", "status", "statefulset/atlas-sidecar-store",
                f"--timeout={int(WAIT)}s", timeout=WAIT + 30,
            )  # fmt: skip
            follower.wait(timeout=60)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        log.seek(0)
        lines = log.read().splitlines()
    new = lab.kubectl_json("-n", PVC_NS, "get", "pod", pod)
    assert new["metadata"]["uid"] != uid, "the pod was not replaced"  # type: ignore[index]
    closed = json.loads(lines[-1])
    assert closed["event"] == "closed" and closed["flushed"] is True, lines[-1]
    assert closed["dropped"] == 0
    acked = {i for line in lines if line.startswith("acked ") for i in line[6:].split(",")}
    assert len(acked) == closed["acked"] > 0
    stored = set(
        lab.kubectl(
            "-n", PVC_NS, "exec", "-i", pod, "-c", "atlas-sidecar", "--", "python", "-",
            input=(HERE / "store_ids.py").read_text(),
        ).stdout.split()
    )  # fmt: skip
    FACTS["acked before the restart"] = len(acked)
    FACTS["in the store after it"] = len(stored)
    assert acked <= stored, f"{len(acked - stored)} acked events missing after the restart"


# -- the llama-server overlay: the gateway as the pod's front door ------------

LLAMA_CACHE = Path(os.environ.get("ATLAS_SIDECAR_CACHE", Path.home() / ".cache" / "atlas-sidecar"))
LLAMA_NS = "lab-llama"


def _llama_image(lab: LabCluster) -> None:
    """An image of the llama-server that make llama-server built, with make llama-model's GGUF."""
    binary = next(LLAMA_CACHE.glob("llama-server-*/llama-server"), None)
    model = next(LLAMA_CACHE.glob("smollm2-*/*.gguf"), None)
    if binary is None or model is None:
        subprocess.run(
            ["make", "--no-print-directory", "-C", str(ROOT), "llama-server", "llama-model"],
            check=True,
            capture_output=True,
        )
        binary = next(LLAMA_CACHE.glob("llama-server-*/llama-server"))
        model = next(LLAMA_CACHE.glob("smollm2-*/*.gguf"))
    ctx = lab.workdir / "llama-image"
    ctx.mkdir()
    shutil.copy(binary, ctx / "llama-server")
    shutil.copy(model, ctx / "base.gguf")
    # The one library the build links that the base rootfs lacks (same Debian).
    shutil.copy("/usr/lib/x86_64-linux-gnu/libgomp.so.1", ctx / "libgomp.so.1")
    (ctx / "Containerfile").write_text(
        f"FROM {IMAGE}\n"
        "COPY llama-server /usr/local/bin/llama-server\n"
        "COPY libgomp.so.1 /usr/lib/x86_64-linux-gnu/libgomp.so.1\n"
        "COPY base.gguf /models/base.gguf\n"
        'ENTRYPOINT ["/usr/local/bin/llama-server"]\n'
        "CMD []\n"
    )
    ref = "localhost/atlas-lab-llama-server:1"
    subprocess.run(
        _podman("build", "--quiet", "--pull=never", "--network=none", "-t", ref, str(ctx)),
        check=True,
        capture_output=True,
    )
    archive = lab.workdir / "llama-server.tar"
    subprocess.run(
        _podman("save", "--quiet", "--format", "docker-archive", "-o", str(archive), ref),
        check=True,
        capture_output=True,
    )
    lab.load_image(archive)


def test_the_gateway_fronts_llama_server(lab: LabCluster) -> None:
    _llama_image(lab)
    servicemonitor_kind(lab)  # the overlay has one
    make_deploy(lab, str(HERE / "overlays" / "llama-server"), LLAMA_NS)
    (pod,) = pods(lab, LLAMA_NS, "app.kubernetes.io/name=llama-server")
    assert ready(pod), "the gateway's readiness passes /health through to llama-server"
    base = f"/api/v1/namespaces/{LLAMA_NS}/services/llama-server:http/proxy"
    models = lab.kubectl("get", "--raw", f"{base}/v1/models")
    assert "base" in models.stdout
    FACTS["llama-server /v1/models through the gateway"] = json.loads(models.stdout)


def test_undeploy_and_teardown_leave_nothing(lab: LabCluster) -> None:
    t0 = time.monotonic()
    out = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "undeploy",
         f"OVERLAY={HERE / 'overlays' / 'producer'}", f"NAMESPACE={PVC_NS}", f"IMAGE={IMAGE}"],
        env=lab.env(), capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    TIMINGS["make undeploy"] = round(time.monotonic() - t0, 1)
    assert out.returncode == 0, out.stderr
    assert lab.kubectl("-n", PVC_NS, "get", "statefulset", "-o", "name").stdout == ""
    # The data and the tokens stay.
    assert lab.kubectl("-n", PVC_NS, "get", "pvc", "-o", "name").stdout.strip()
    assert "atlas-sidecar-tokens" in lab.kubectl("-n", PVC_NS, "get", "secrets").stdout
    lab.stop()
    assert lab.leaks() == []
