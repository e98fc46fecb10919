"""A one-node Kubernetes of real binaries, in a network namespace of its own.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd and
kubelet run as child processes under ``nsenter --net=`` into a namespace with
one veth pair and no default route: nothing in the cluster can reach out, and
nothing outside reaches in except through the API server's port, which the
test's kubectl reaches by running inside the namespace too. Not ``ip netns
exec``: it remounts /sys, and kubelet then finds no cgroup mounts.

``stop()`` is idempotent and undoes everything ``start()`` did, in the order
that lets each part clean up after itself: workloads, then kubelet and the
containerd shims, the control plane (API server before etcd), the mounts
under the work folder and the pod network namespaces made by CNI, and last
the namespace itself. ``leaks()`` says what would still be left.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

NODE_IP = "10.213.0.1"
PEER_IP = "10.213.0.2"
POD_CIDR = "10.214.0.0/24"
SERVICE_CIDR = "10.215.0.0/24"
NODE = "lab-node"
ADMIN_TOKEN_NAME = "admin"


class LabError(Exception):
    pass


def _run(argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


class LabCluster:
    """A cluster under ``workdir``; ``bin_dir`` holds the Kubernetes binaries."""

    def __init__(self, workdir: Path, bin_dir: Path, *, name: str | None = None) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.netns = name or f"atlas-lab-{os.getpid()}"
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.containerd_sock = workdir / "containerd" / "containerd.sock"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[object] = []
        # Pod network namespaces (bind mounts under /run/netns made by CNI),
        # as containerd names them; only these are ever removed here.
        self._pod_netns: set[str] = set()
        # Inodes of those namespaces and of the cluster's own: a process still
        # in one of them is a leak, whatever its command line says.
        self._netns_inodes: set[int] = set()
        self._started = False
        self._stopped = False

    # -- commands inside the namespace --------------------------------------

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*self.nsenter, "kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and out.returncode != 0:
            raise LabError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out

    def kubectl_json(self, *args: str) -> dict[str, object]:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)  # type: ignore[no-any-return]

    def env(self) -> dict[str, str]:
        """For processes outside the namespace that call kubectl through ``KUBECTL``."""
        wrapper = self.workdir / "kubectl"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECTL": str(wrapper),
        }

    # -- start ---------------------------------------------------------------

    def start(self) -> LabCluster:
        if self._started:
            return self
        self._started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._network()
        self._pki()
        self._spawn("etcd", [
            "etcd", f"--data-dir={self.workdir / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=default=http://127.0.0.1:2380", "--logger=zap", "--log-level=warn",
        ])  # fmt: skip
        self._apiserver()
        self._wait(
            lambda: self.kubectl("get", "--raw=/readyz", check=False).returncode == 0, "API server"
        )
        pki = self.workdir / "pki"
        self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--bind-address=127.0.0.1", "--secure-port=10257",
        ])  # fmt: skip
        self._spawn("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259",
        ])  # fmt: skip
        self._containerd()
        self._kubelet()
        self._wait(self._node_ready, "node Ready", timeout=120)
        return self

    def _network(self) -> None:
        if _run(["ip", "netns", "add", self.netns]).returncode != 0:
            raise LabError(f"cannot add network namespace {self.netns} (root needed)")
        ns = ["ip", "-n", self.netns]
        for argv in (
            [*ns, "link", "set", "lo", "up"],
            [*ns, "link", "add", "lab0", "type", "veth", "peer", "name", "lab1"],
            [*ns, "addr", "add", f"{NODE_IP}/24", "dev", "lab0"],
            [*ns, "addr", "add", f"{PEER_IP}/24", "dev", "lab1"],
            [*ns, "link", "set", "lab0", "up"],
            [*ns, "link", "set", "lab1", "up"],
        ):
            out = _run(argv)
            if out.returncode != 0:
                raise LabError(f"{' '.join(argv)}: {out.stderr.strip()}")
        # A kubectl that any process (make deploy) can run: it enters the namespace.
        wrapper = self.workdir / "kubectl"
        wrapper.write_text(
            f"#!/bin/sh\nexec nsenter --net=/run/netns/{self.netns} -- kubectl "
            f'--kubeconfig={self.kubeconfig} "$@"\n'
        )
        wrapper.chmod(0o755)

    def _pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atlas-lab-ca")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "localhost")
        ]
        first_service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
        for ip in (NODE_IP, "127.0.0.1", str(first_service_ip)):
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        pkcs8 = serialization.PrivateFormat.PKCS8
        plain = serialization.NoEncryption()
        (pki / "ca.crt").write_bytes(ca.public_bytes(pem))
        (pki / "ca.key").write_bytes(ca_key.private_bytes(pem, pkcs8, plain))
        (pki / "apiserver.crt").write_bytes(cert.public_bytes(pem))
        (pki / "apiserver.key").write_bytes(key.private_bytes(pem, pkcs8, plain))
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(sa.private_bytes(pem, pkcs8, plain))
        (pki / "sa.pub").write_bytes(
            sa.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        token = os.urandom(24).hex()
        (pki / "tokens.csv").write_text(f'{token},{ADMIN_TOKEN_NAME},1,"system:masters"\n')
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "lab",
                            "cluster": {
                                "server": f"https://{NODE_IP}:6443",
                                "certificate-authority": str(pki / "ca.crt"),
                            },
                        }
                    ],
                    "users": [{"name": "admin", "user": {"token": token}}],
                    "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "admin"}}],
                    "current-context": "lab",
                }
            )
        )
        self.kubeconfig.chmod(0o600)

    def _apiserver(self) -> None:
        pki = self.workdir / "pki"
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:2379", f"--advertise-address={NODE_IP}",
            "--bind-address=0.0.0.0", "--secure-port=6443",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--kubelet-preferred-address-types=InternalIP",
            "--enable-priority-and-fairness=false", "--profiling=false",
        ])  # fmt: skip

    def _containerd(self) -> None:
        root = self.workdir / "containerd"
        cni = self.workdir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-lab.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "lab",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "labbr0",
                            "isGateway": True,
                            "ipMasq": False,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR}]],
                                "dataDir": str(cni / "ipam"),
                            },
                        },
                        {"type": "loopback"},
                    ],
                }
            )
        )
        root.mkdir(exist_ok=True)
        (root / "config.toml").write_text(
            f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{root / "containerd.sock.ttrpc"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which a
  # sandboxed host may not grant: runc then fails every pod sandbox (kubelet
  # asks -998 for it) with "can't get final child's PID from pipe". Restricted,
  # containerd keeps the requested score at or above its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / "net.d"}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"""
        )
        self._spawn("containerd", ["containerd", f"--config={root / 'config.toml'}"])
        self._wait(lambda: self.ctr("version").returncode == 0, "containerd", timeout=30)

    def ctr(self, *args: str, input_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", f"--address={self.containerd_sock}", "-n", "k8s.io", *args]
        if input_file is None:
            return _run(argv)
        with input_file.open("rb") as f:
            out = subprocess.run(argv, stdin=f, capture_output=True, check=False)
        return subprocess.CompletedProcess(
            argv, out.returncode, out.stdout.decode(), out.stderr.decode()
        )

    def load_image(self, archive: Path) -> None:
        """Imports a docker-archive tarball (podman save) for kubelet."""
        out = self.ctr("images", "import", "--all-platforms", "-", input_file=archive)
        if out.returncode != 0:
            raise LabError(f"ctr import {archive}: {out.stderr.strip()}")

    def _kubelet(self) -> None:
        kdir = self.workdir / "kubelet"
        kdir.mkdir(exist_ok=True)
        (kdir / "config.yaml").write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
                    "cgroupDriver": "cgroupfs",
                    # This kind of host has cgroups v1 (hybrid); kubelet refuses them by default.
                    "failCgroupV1": False,
                    "failSwapOn": False,
                    "authentication": {
                        "anonymous": {"enabled": True},
                        "webhook": {"enabled": False},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "address": NODE_IP,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "resolvConf": "",
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "serializeImagePulls": False,
                    "podCIDR": POD_CIDR,
                    "registerNode": True,
                }
            )
        )
        self._spawn("kubelet", [
            str(self.bin_dir / "kubelet"), f"--config={kdir / 'config.yaml'}",
            f"--kubeconfig={self.kubeconfig}", f"--root-dir={kdir / 'root'}",
            f"--node-ip={NODE_IP}", f"--hostname-override={NODE}", "--v=1",
        ])  # fmt: skip

    def _node_ready(self) -> bool:
        out = self.kubectl("get", "node", NODE, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conds = json.loads(out.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(
            [*self.nsenter, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait(self, ready: object, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise LabError(f"{name} exited {proc.returncode}: {self.log_tail(name)}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.5)
        raise LabError(f"{what} not ready after {timeout:.0f} s")

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- stop ----------------------------------------------------------------

    def stop(self) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        if "kubelet" in self._procs and self._procs["kubelet"].poll() is None:
            # Workloads first, in the foreground, so kubelet stops their
            # containers and unmounts their volumes itself.
            for ns in self._namespaces():
                self.kubectl(
                    "delete", "namespace", ns, "--wait=true", "--timeout=90s",
                    check=False, timeout=120,
                )  # fmt: skip
            self.kubectl(
                "delete", "pods", "--all", "-A", "--grace-period=5", "--wait=true",
                "--timeout=60s", check=False, timeout=90,
            )  # fmt: skip
        for name in ("kubelet", "kube-scheduler", "kube-controller-manager"):
            self._terminate(name)
        self._pod_netns |= self._sandbox_netns()
        for path in [f"/run/netns/{self.netns}", *self._pod_netns]:
            with contextlib.suppress(OSError):
                self._netns_inodes.add(os.stat(path).st_ino)
        self._kill_shims()
        self._terminate("containerd")
        self._terminate("kube-apiserver")
        self._terminate("etcd")
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._unmount()
        for path in sorted(self._pod_netns):
            if Path(path).exists():
                _run(["umount", path])
                with contextlib.suppress(OSError):
                    Path(path).unlink()
        _run(["ip", "netns", "delete", self.netns])
        self._remove_cgroups()

    def _namespaces(self) -> list[str]:
        out = self.kubectl("get", "namespaces", "-o", "name", check=False)
        system = {"default", "kube-system", "kube-public", "kube-node-lease"}
        names = [n.removeprefix("namespace/") for n in out.stdout.split()]
        return [n for n in names if n not in system]

    def _terminate(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def _own_pids(self) -> list[int]:
        """Processes still running anything of this cluster (shims, pods, servers)."""
        mine = []
        needles = (str(self.workdir).encode(), str(self.containerd_sock).encode())
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if any(n in cmdline for n in needles):
                mine.append(int(entry))
        return mine

    def _netns_pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                link = os.readlink(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if int(link.removeprefix("net:[").rstrip("]")) in self._netns_inodes:
                pids.append(int(entry))
        return pids

    def _shim_pids(self) -> list[int]:
        return [p for p in self._own_pids() if _comm(p).startswith("containerd-shim")]

    def _kill_shims(self) -> None:
        for _ in range(2):
            for pid in self._shim_pids():
                # A shim's children are the pod's processes: kill them with it.
                for child in _children(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    def _mounts(self) -> list[str]:
        prefix = str(self.workdir)
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(point)
        return found

    def _unmount(self) -> None:
        for _ in range(3):
            points = self._mounts()
            if not points:
                return
            for point in sorted(points, key=len, reverse=True):
                _run(["umount", "-l", point])

    def _sandbox_netns(self) -> set[str]:
        """The network namespace paths of the pod sandboxes containerd still knows."""
        found: set[str] = set()
        out = self.ctr("containers", "ls", "-q")
        for cid in out.stdout.split():
            info = self.ctr("containers", "info", cid)
            if info.returncode != 0:
                continue
            spec = json.loads(info.stdout).get("Spec") or {}
            for ns in spec.get("linux", {}).get("namespaces", []):
                if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/"):
                    found.add(ns["path"])
        return found

    def _remove_cgroups(self) -> None:
        for top in Path("/sys/fs/cgroup").iterdir() if Path("/sys/fs/cgroup").exists() else []:
            pods = top / "kubepods"
            if pods.is_dir():
                for d in sorted(_dirs(pods), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()

    def leaks(self) -> list[str]:
        """What of this cluster is still on the host: processes, mounts, namespaces."""
        found = [f"process {p} ({_comm(p)})" for p in self._own_pids()]
        found += [f"process {p} ({_comm(p)}) in the cluster's network" for p in self._netns_pids()]
        found += [
            f"process {name} ({proc.pid})"
            for name, proc in self._procs.items()
            if proc.poll() is None
        ]
        found += [f"mount {m}" for m in self._mounts()]
        names = set(os.listdir("/run/netns")) if Path("/run/netns").exists() else set()
        if self.netns in names:
            found.append(f"network namespace {self.netns}")
        found += [f"pod network namespace {p}" for p in sorted(self._pod_netns) if Path(p).exists()]
        return found

    def remove_workdir(self) -> None:
        if not self._mounts():
            shutil.rmtree(self.workdir, ignore_errors=True)


PAUSE_IMAGE = "localhost/atlas-lab-pause:1"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _children(pid: int) -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            yield int(entry)
            yield from _children(int(entry))


def _dirs(root: Path) -> Iterator[Path]:
    for d in root.rglob("*"):
        if d.is_dir():
            yield d
    yield root
