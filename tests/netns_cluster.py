"""A Ray cluster of two hosts on this machine, for the multi-node tests and benchmarks.

Each node is a network namespace of its own (``ip netns``), joined to the other by a veth
pair, with addresses that exist only inside the namespaces (:data:`SUBNET`): the head
``.1``, the worker ``.2``. Every process of a node runs in its namespace: the node's Ray
daemons (``ray start --block``, one CPU each unless told) and what the caller runs there
(:meth:`NetnsCluster.run`: the driver on the head, a user's process on either node;
:func:`start_s3`, :func:`start_mlflow`: the S3 and MLflow servers on the head). Nothing shares
a disk: each node has its own temp and working folder under the cluster's root, and the
worker runs in a mount namespace of its own with a private tmpfs over that whole root, so
the driver's files (and the head's) are out of its reach; it reads and writes S3 only.

Cleanup (``with`` block end, also on failure) kills every process of both namespaces by pid
(``ip netns pids``: the namespaces are this cluster's own, so all of them are its
processes), deletes the namespaces (which removes the veth pair) and the root folder.

Needs root (``ip netns add``). ``python tests/netns_cluster.py [--nodes 1|2] -- CMD...``
brings a cluster up with a moto S3 server on the head, runs CMD on the head (with
``$RAY_ADDRESS`` and the S3 settings) and takes the cluster down; the benchmarks'
``--address`` figures in docs/benchmarks.md were taken this way.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# A private range, used only inside the namespaces: nothing on the machine routes to it.
SUBNET = "10.213.7"
RAY_PORT = 6379
VENV_BIN = Path(sys.executable).parent
_ids = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class NetnsCluster:
    """Two namespaces (``head``, ``worker``) joined by a veth pair; nodes started and killed
    on demand. ``env``: variables for every process of the cluster (S3 endpoint and keys of
    the nodes themselves, as an instance role would give them)."""

    NODES = ("head", "worker")

    def __init__(self, env: dict[str, str] | None = None, ray_port: int = RAY_PORT) -> None:
        tag = f"wf{os.getpid()}x{next(_ids)}"
        self.netns = {n: f"{tag}{n[0]}" for n in self.NODES}
        self.ip = {"head": f"{SUBNET}.1", "worker": f"{SUBNET}.2"}
        self.address = f"{self.ip['head']}:{ray_port}"
        self.ray_port = ray_port
        self.env = dict(env or {})
        # Short: Ray's socket paths under a node's temp dir must fit 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="wfnc-"))
        self.driver_dir = self.root / "driver"
        self.procs: dict[str, list[subprocess.Popen]] = {n: [] for n in self.NODES}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> NetnsCluster:
        try:
            self._create_network()
            for d in (self.driver_dir, self.node_dir("head")):
                d.mkdir(parents=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create_network(self) -> None:
        h, w = self.netns["head"], self.netns["worker"]
        for ns in (h, w):
            _ip("netns", "add", ns)
        _ip("link", "add", "wfh", "netns", h, "type", "veth", "peer", "name", "wfw", "netns", w)
        for node, ns, dev in (("head", h, "wfh"), ("worker", w, "wfw")):
            _ip("-n", ns, "addr", "add", f"{self.ip[node]}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def pids(self, node: str) -> list[int]:
        """Every process in ``node``'s namespace."""
        out = _ip("netns", "pids", self.netns[node], check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self, node: str) -> None:
        """Kill every process of ``node`` at once (SIGKILL), as a lost machine would stop."""
        for _ in range(20):  # a dying daemon may have forked a moment before
            pids = self.pids(node)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for p in self.procs[node]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs[node].clear()

    def close(self) -> None:
        for node in self.NODES:
            if self.netns[node] in _ip("netns", "list", check=False).stdout.split():
                self.kill(node)
                _ip("netns", "del", self.netns[node], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- nodes -------------------------------------------------------------------------------
    def node_dir(self, node: str) -> Path:
        """The node's own folder (``tmp/``: its temp dir and Ray's, ``work/``: its working
        folder); the worker's lives in its private tmpfs, invisible from here."""
        return self.root / node

    def _env(self, node: str) -> dict[str, str]:
        env = {**os.environ, **self.env,
               "TMPDIR": str(self.node_dir(node) / "tmp"),
               # Ray otherwise binds a node to loopback (the project's offline settings).
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
               "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
               # Ray's helpers that attach by themselves would otherwise pick among every
               # GCS running on this machine (other clusters included).
               "RAY_ADDRESS": self.address}
        return env

    def _spawn(self, node: str, argv: Sequence[str], private_root: bool = False,
               **popen) -> subprocess.Popen:
        d = self.node_dir(node)
        prelude = ""
        if private_root:
            # The node's own view of the files: a tmpfs over the cluster's root hides the
            # driver's and the head's folders, then its own folders are made inside it.
            prelude = f"mount -t tmpfs -o mode=0700 wfnode {self.root} && "
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    prelude + f"mkdir -p {d}/tmp {d}/work && cd {d}/work && exec \"$@\"",
                    "sh", *argv]
        else:
            (d / "tmp").mkdir(parents=True, exist_ok=True)
            (d / "work").mkdir(parents=True, exist_ok=True)
            popen.setdefault("cwd", d / "work")
        p = subprocess.Popen(["ip", "netns", "exec", self.netns[node], *argv],
                             env=popen.pop("env", None) or self._env(node),
                             start_new_session=True, **popen)
        self.procs[node].append(p)
        return p

    def start_node(self, node: str, num_cpus: int = 1) -> subprocess.Popen:
        """``ray start --block`` on ``node`` (the head with GCS on :attr:`address`)."""
        tmp = self.node_dir(node) / "tmp"
        argv = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
                "--node-ip-address", self.ip[node], "--num-cpus", str(num_cpus),
                "--num-gpus", "0", "--temp-dir", str(tmp / "ray")]
        if node == "head":
            argv += ["--head", "--port", str(self.ray_port), "--include-dashboard", "false"]
        else:
            argv += ["--address", self.address]
        log = open(self.root / f"{node}-ray.log", "ab")  # the driver's side: readable here
        with log:
            return self._spawn(node, argv, private_root=node == "worker",
                               stdout=log, stderr=subprocess.STDOUT)

    def run(self, argv: Sequence[str], node: str = "head", **popen) -> subprocess.Popen:
        """Start ``argv`` as a user's process on ``node``: on the head (the driver's host) in
        the driver's folder; on the worker in a private view of its own, which sees neither
        the driver's files nor the worker node's."""
        own = {"TMPDIR": str(self.driver_dir)} if node == "head" else {}
        env = {**self._env(node), **own, **popen.pop("env", {})}
        # A user's process: the project applies its own Ray settings.
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        if node == "head":
            popen.setdefault("cwd", self.driver_dir)
        return self._spawn(node, argv, env=env, private_root=node == "worker", **popen)

    def wait_for_nodes(self, n: int, timeout_s: float = 120.0) -> None:
        """Until the head lists ``n`` live nodes (``ray status`` run on the head)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            p = self._spawn("head", [str(VENV_BIN / "ray"), "status", "--address", self.address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out = p.communicate(timeout=timeout_s)[0]
            self.procs["head"].remove(p)
            if out.count("node_") >= n and "Pending" in out:
                active = out.split("Active:", 1)[-1].split("Pending", 1)[0]
                if active.count("node_") >= n:
                    return
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray node(s) not up in {timeout_s:.0f} s; logs in {self.root}")


S3_PORT = 9000


def s3_env(cluster_ip: str) -> dict[str, str]:
    """Every process's S3 settings for a moto server on ``cluster_ip`` (:func:`start_s3`);
    moto takes any keys."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{cluster_ip}:{S3_PORT}"}


def start_s3(cluster: NetnsCluster) -> subprocess.Popen:
    """A moto S3 server on the head's address: the one store both nodes reach."""
    return cluster.run([str(VENV_BIN / "moto_server"), "-H", cluster.ip["head"],
                        "-p", str(S3_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


MLFLOW_PORT = 5000


def start_mlflow(cluster: NetnsCluster, artifacts: str) -> str:
    """An MLflow tracking server on the head's address, run as ``infra/deploy/compose.yaml``
    runs it: its sqlite backend store in the head's own folder, the artifacts served through
    it from ``artifacts`` (an s3:// URI on :func:`start_s3`'s server), so that clients log and
    download models with no S3 access of their own. Returns its URL; it answers once its
    database is set up (``/health``, reachable only from inside the cluster)."""
    from infra.offline import OFFLINE_ENV

    head, folder = cluster.ip["head"], cluster.node_dir("head") / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**OFFLINE_ENV, **cluster._env("head"),
           "MLFLOW_S3_ENDPOINT_URL": cluster.env["AWS_ENDPOINT_URL"]}
    log = open(cluster.root / "mlflow.log", "ab")  # the driver's side: readable here
    with log:
        cluster._spawn("head", [str(VENV_BIN / "mlflow"), "server", "--host", head,
                                "--port", str(MLFLOW_PORT),
                                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                "--artifacts-destination", artifacts, "--workers", "1",
                                "--allowed-hosts", f"{head}:{MLFLOW_PORT}"],
                       env=env, stdout=log, stderr=subprocess.STDOUT)
    return f"http://{head}:{MLFLOW_PORT}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, choices=(1, 2), default=2)
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="-- CMD...: run on the head with $RAY_ADDRESS and the S3 settings")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    with NetnsCluster(env=s3_env(f"{SUBNET}.1")) as cluster:
        cluster.start_node("head")
        if args.nodes == 2:
            cluster.start_node("worker")
        start_s3(cluster)
        cluster.wait_for_nodes(args.nodes)
        p = cluster.run(cmd, cwd=Path.cwd(), env={"RAY_ADDRESS": cluster.address})
        return p.wait()


if __name__ == "__main__":
    sys.exit(main())
