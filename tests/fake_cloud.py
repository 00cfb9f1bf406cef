"""Ray's own autoscaler on fake nodes, shaped like the cluster file we ship.

`autoscaling_config` turns cluster/aws/cluster.yaml into a config for Ray's fake multi-node
provider: the same node type names, min/max workers and idle timeout, resources scaled down to
this machine. `SpotFakeProvider` is Ray's fake provider (every node a real raylet on this
machine) plus what a cloud does to spot nodes: it takes one back when asked (a file the test
writes), through the provider, so the autoscaler sees the node go and launches a replacement.
The monitor process (started by `ray start --head --autoscaling-config=...`) imports this module:
its folder goes on that process's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

# cluster/aws/cluster.yaml's instance types, per node on this machine: one engine replica per
# gpu_worker (a GPU holds one replica; its accelerator label pins the replicas there, and the
# replicas run on the CPU here), 1-CPU cpu_workers (the small nodes shuffles must cope with).
SCALED = {
    "cpu_worker": {"CPU": 1},
    "gpu_worker": {"CPU": 1, "GPU": 1},
}
MAX_WORKERS = {"cpu_worker": 3, "gpu_worker": 2}
OBJECT_STORE = 100 * 2**20


def autoscaling_config(aws_yaml: Path, gcs_address: str, reclaim_file: Path, idle_timeout_minutes: float,
                       v2: bool = False) -> dict:
    src = yaml.safe_load(aws_yaml.read_text())
    types = {}
    for name, spec in src["available_node_types"].items():
        if name == src["head_node_type"]:
            # The head keeps the file's resources (CPU 0: it schedules no work).
            types[name] = {"resources": dict(spec.get("resources", {})), "node_config": {}, "max_workers": 0}
            continue
        resources = {**SCALED[name], **spec.get("resources", {}), "object_store_memory": OBJECT_STORE}
        types[name] = {"resources": resources, "node_config": {}, "min_workers": spec.get("min_workers", 0),
                       "max_workers": min(spec["max_workers"], MAX_WORKERS[name])}
    return {
        "cluster_name": src["cluster_name"] + "-test",
        "max_workers": sum(MAX_WORKERS.values()),
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": src.get("upscaling_speed", 1.0),
        "provider": {"type": "external", "module": "fake_cloud.SpotFakeProvider", "gcs_address": gcs_address,
                     "head_node_type": src["head_node_type"],
                     "reclaim_file": str(reclaim_file), "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True,
                     # with autoscaler v2 (v2=True) the fake provider launches each
                     # node of a request and knows its head by id.
                     **({"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID} if v2 else {})},
        "head_node_type": src["head_node_type"],
        "available_node_types": types,
        "auth": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _patient_node_start(wait_s: float = 180.0) -> None:
    """Ray's fake node start gives a new raylet 30 s (hard-coded in ray._private.node.Node) to
    register with the GCS. On a 2-core machine whose cores the other test worker keeps busy, the
    node's agents (Python processes importing Ray) can take longer, and the launch then fails
    and leaves a raylet behind that registers later, unknown to the provider. In this provider's
    process only, the lookup it polls retries for up to `wait_s` before it reports "not yet"."""
    import ray._private.services as services

    if getattr(services.get_node, "_patient", False):
        return
    original = services.get_node

    def get_node(*args, **kwargs):
        # The Node being started is the caller (ray._private.node.Node.__init__). Its raylet can
        # also die at start: Ray 2.60's raylet aborts when the node's dashboard agent has not
        # written its ports within a hard-coded 15 s, which a loaded 2-core machine can miss.
        # Then waiting is pointless: fail now, and the autoscaler launches the node again.
        caller = sys._getframe(1).f_locals.get("self")
        end = time.monotonic() + wait_s
        while True:
            try:
                return original(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > end or _raylet_died(caller):
                    raise
                time.sleep(0.5)

    get_node._patient = True
    services.get_node = get_node


def _own_runtime_env_dir() -> None:
    """Each fake node gets its own runtime-env folder, as each machine of a real cluster has its
    own disk. Ray's fake nodes share the head's session folder, and a node's runtime-env agent
    re-unpacks a job's working_dir (rmtree, then unzip) the first time the job's tasks land on
    it: in the shared folder that deleted the directory the job's driver runs in, mid-job."""
    import ray._private.parameter as parameter

    if getattr(parameter.RayParams.__init__, "_own_dir", False):
        return
    original = parameter.RayParams.__init__

    def init(self, *args, **kwargs):
        node_id = (kwargs.get("env_vars") or {}).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
        if node_id and not kwargs.get("runtime_env_dir_name"):
            kwargs["runtime_env_dir_name"] = f"runtime_resources_node{node_id[-5:]}"
        original(self, *args, **kwargs)

    init._own_dir = True
    parameter.RayParams.__init__ = init


def _raylet_died(node) -> bool:
    import ray._private.ray_constants as ray_constants

    procs = getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_RAYLET, [])
    return bool(procs) and procs[0].process.poll() is not None


class SpotFakeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider that can lose a spot node: when `reclaim_file` names a node
    type, one running node of that type is terminated (all its processes killed, as when a cloud
    takes the machine back) and its id is written to `<reclaim_file>.done`."""

    def __init__(self, provider_config, cluster_name):
        _patient_node_start()
        _own_runtime_env_dir()
        super().__init__(provider_config, cluster_name)
        self._reclaim = Path(provider_config["reclaim_file"])
        # Ray's fake provider tags its head "ray.head.default"; ours keeps the file's head type name.
        self._nodes[self._head_node_id]["tags"][TAG_RAY_USER_NODE_TYPE] = provider_config["head_node_type"]

    def _maybe_reclaim(self) -> None:
        if not self._reclaim.exists():
            return
        kind, _, wanted = self._reclaim.read_text().strip().partition(":")  # "type:<name>" or "node:<id>"
        with self.lock:
            victims = [n for n, v in self._nodes.items() if "node" in v and (
                n == wanted if kind == "node" else v["tags"].get(TAG_RAY_USER_NODE_TYPE) == wanted)]
        if not victims:
            return
        victim = victims[0]
        self.terminate_node(victim)
        done = self._reclaim.with_name(self._reclaim.name + ".done")
        done.write_text(json.dumps({"node_id": victim}))
        os.unlink(self._reclaim)

    def non_terminated_nodes(self, tag_filters):
        self._maybe_reclaim()
        return super().non_terminated_nodes(tag_filters)


class YieldTheCpu:
    """While a fake cloud runs, the other pytest-xdist workers' processes (and everything they
    start) run at nice 10. Why: Ray 2.60's raylet aborts at start when its node's dashboard agent
    has not written its ports within a hard-coded 15 s, and on a 2-core machine whose other test
    worker is busy with vLLM the agent's imports take longer, so the autoscaler's nodes kept
    failing to launch (measured in CI: "Failed to launch 1 node(s)" every ~35 s). Raising the other
    workers' niceness needs no privilege; it is not lowered again (that would), which only means
    they stay polite for the rest of the run. Outside pytest-xdist this does nothing."""

    def __init__(self, niceness: int = 10, every_s: float = 5.0):
        import threading

        self.niceness, self.every_s, self._stop = niceness, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "YieldTheCpu":
        if os.environ.get("PYTEST_XDIST_WORKER"):
            self._sweep()
            self._thread.start()  # processes re-parented away from a worker are caught here
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sweep()

    def _sweep(self) -> None:
        import psutil

        me = psutil.Process()
        try:
            others = [p for p in psutil.Process(os.getppid()).children() if p.pid != me.pid]
        except psutil.Error:
            return
        for worker in others:
            try:
                tree = [worker] + worker.children(recursive=True)
            except psutil.Error:
                continue
            for p in tree:
                try:
                    if p.nice() < self.niceness:
                        p.nice(self.niceness)
                except psutil.Error:  # gone, or not ours to renice
                    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCloud:
    """A head started with `ray start --head --block --autoscaling-config=...` in a session of its
    own: Ray's monitor on the head runs the autoscaler, which launches and terminates fake nodes
    (raylets on this machine) through SpotFakeProvider. `stop()` kills exactly the processes of
    that session (head, monitor, the nodes it launched), never another Ray on the machine."""

    def __init__(self, workdir: Path, aws_yaml: Path, idle_timeout_minutes: float, v2: bool = False):
        import ray._private.services as services

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ip = services.get_node_ip_address()
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"{self.ip}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.reclaim_file = self.workdir / "reclaim"
        self.v2 = v2
        self.config = autoscaling_config(aws_yaml, self.address, self.reclaim_file, idle_timeout_minutes, v2)
        self.config_path = self.workdir / "autoscaling.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc = None
        self._token_env = None

    def start(self, timeout: float = 120) -> "FakeCloud":
        # Token authentication on, as in cluster/aws/cluster.yaml. `ray start` does not create a
        # token (it fails where ~/.ray/auth_token is missing, as on a fresh machine): the cluster
        # gets its own, in its folder, and this process, the head and every node read it from
        # RAY_AUTH_TOKEN_PATH (a client connects with RAY_AUTH_MODE=token).
        token = self.workdir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self._token_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        if self.v2:
            env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [ray_bin, "start", "--head", "--block", f"--port={self.port}", "--num-cpus=0",
               f"--autoscaling-config={self.config_path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--object-store-memory={OBJECT_STORE}",
               "--disable-usage-stats"]
        self.log = open(self.workdir / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {(self.workdir / 'head.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.dashboard_port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the autoscaling head did not come up")

    @staticmethod
    def use_token_auth() -> None:
        """Make this process a token client, as `ray.init()` does when it starts a local cluster:
        ray.init with an explicit address does not turn it on by itself."""
        from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default

        enable_token_auth_by_default()

    def reclaim(self, node_type: str = "", node_id: str = "", timeout: float = 60) -> str:
        """Have the provider take back a running node (a spot reclaim): the one with `node_id`, or
        one of `node_type`; returns its id."""
        done = self.reclaim_file.with_name(self.reclaim_file.name + ".done")
        done.unlink(missing_ok=True)
        self.reclaim_file.write_text(f"node:{node_id}" if node_id else f"type:{node_type}")
        end = time.time() + timeout
        while time.time() < end:
            if done.exists():
                return json.loads(done.read_text())["node_id"]
            time.sleep(0.2)
        raise AssertionError(f"the provider did not reclaim node {node_id or 'of type ' + node_type}")

    def stop(self) -> None:
        import psutil

        if self.proc is None:
            return
        sid = self.proc.pid  # the session leader: start_new_session made its pid the session id
        ours = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    ours.append(p)
            except (ProcessLookupError, psutil.Error, PermissionError):
                continue
        for p in ours:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(ours, timeout=30)
        # What `ray stop` would also do: forget this cluster as the machine's current one; left
        # behind, it sent a later `ray.util.state` call (memory_summary) to this dead address.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        try:
            if current.read_text().strip() == self.address:
                current.unlink()
        except OSError:
            pass
        self.proc = None
        self.log.close()
        if self._token_env is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = self._token_env
