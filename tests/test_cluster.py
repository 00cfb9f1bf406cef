"""A real autoscaling Ray cluster on this machine: Ray's own autoscaler (v1, as the shipped
cluster files run it) on fake nodes whose types come from cluster/aws/cluster.yaml (a CPU-only
head that schedules nothing, 1-CPU `cpu_worker`s and `gpu_worker`s from 0; see fake_cloud.py).
Every node is a real raylet; the engine replicas are pinned to the gpu_worker group by its
accelerator label and run on the CPU.

What a cluster sees, each checked from the GCS's own tables and by id SETS (each input id
exactly once in data/ + exclusions/, none lost, none twice): engine nodes launched from 0 when
an engine stage starts, up to the group's max when more replicas are wanted, and back to 0 after
the idle timeout; the CPU stages (dedup's shuffles, difficulty's sampling, selection's groupby)
on 1-CPU nodes; a stage no node type can hold failing in seconds; a vLLM replica's process
killed and then its node taken back as a spot node (through the provider) mid-stage; a training
node taken back mid-QFT, Ray Train resuming from the checkpoint on the replacement; the driver
killed with SIGKILL mid-stage and the same command run again; S3 that fails requests; and
`ray job submit --working-dir` against the head.

(The fifth failure, a row that makes the engine fail, is in test_integration: an over-long
question ends in exclusions/ as engine_error and the stage completes.)
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import CHAIN_QUESTIONS, REPO, start_local_ray, tiny_config, write_chain_inputs
from fake_cloud import FakeCloud, YieldTheCpu
from scalequest_ray import pipeline
from scalequest_ray.config import load_config
from scalequest_ray.storage import InputError, Storage

# (the module's tests share one autoscaling cluster; make test runs this file alone, after the others)
pytestmark = pytest.mark.cluster
VENV_BIN = str(Path(sys.executable).parent)
NUM_Q = 64  # 16 blocks of 4: a failure lands mid-stage
IDLE_MINUTES = 0.2  # cluster/aws/cluster.yaml's 10 minutes, scaled down: 12 s
ENGINE = {"accelerator_type": "A100", "cpus_per_replica": 1}  # -> gpu_worker nodes


class NodeWatch:
    """Alive nodes per node type over time, from the GCS node table (polled every 0.25 s)."""

    def __init__(self):
        import ray

        self.gcs = ray._private.worker.global_worker.gcs_client
        self.samples: list[tuple[float, dict]] = []
        self.ids: dict[str, set] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> dict:
        counts: dict = {}
        for n in self.gcs.get_all_node_info().values():
            if n.state == 0:  # ALIVE
                counts[n.node_type_name] = counts.get(n.node_type_name, 0) + 1
                self.ids.setdefault(n.node_type_name, set()).add(n.node_id.hex())
        return counts

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), self.now()))
            time.sleep(0.25)

    def alive(self, node_type: str) -> set:
        return {n.node_id.hex() for n in self.gcs.get_all_node_info().values()
                if n.state == 0 and n.node_type_name == node_type}

    def most(self, node_type: str, since: float = 0) -> int:
        return max((c.get(node_type, 0) for t, c in self.samples if t >= since), default=0)

    def stop(self):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, s3_server):
    import ray

    had_local = ray.is_initialized()
    ray.shutdown()
    # The job's `python` is the head's: the venv must be on the PATH the head inherits.
    os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ["PATH"]
    polite = YieldTheCpu().start()
    cluster = FakeCloud(tmp_path_factory.mktemp("cloud"), REPO / "cluster" / "aws" / "cluster.yaml",
                        idle_timeout_minutes=IDLE_MINUTES).start()
    try:
        cluster.use_token_auth()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        polite.stop()
    if had_local:
        start_local_ray()


def _wait(predicate, timeout: float, what: str, poll: float = 0.1):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _no_engine_nodes(watch: NodeWatch, timeout: float = 120):
    """The gpu_worker group back at 0 (the autoscaler's idle timeout) before a test starts."""
    _wait(lambda: watch.now().get("gpu_worker", 0) == 0, timeout, "the engine group to scale down to 0", poll=0.5)


def _config(tiny_model, root, **over) -> dict:
    cfg = tiny_config(tiny_model, str(root), **{
        "storage.rows_per_file": 4,
        "models.tiny.scale": {"batch_size": 4, **ENGINE},
        "stages.questions.generators": [{"name": "tiny", "model": "tiny", "num_questions": NUM_Q}],
        "stages.questions.sampling": {"temperature": 1.0, "top_p": 0.99, "max_tokens": 32},
        **over})
    cfg["pipeline"] = ["questions"]
    return cfg


def _ids(root: Path, stage: str, column: str = "query_id") -> list:
    out = []
    for sub in ("data", "exclusions"):
        for f in sorted((root / stage / sub).glob("*.parquet")):
            out += pq.read_table(f, columns=[column])[column].to_pylist()
    return out


def _assert_exactly_once(root: Path, n: int = NUM_Q):
    ids = _ids(root, "questions")
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert set(ids) == {f"tiny-{i:09d}" for i in range(n)}, "ids were lost"
    m = yaml.safe_load((root / "questions" / "_manifest.json").read_text())
    assert m["rows"] + m["excluded_rows"] == n
    assert not (root / "questions" / "_work").exists() and not (root / "_checkpoints" / "questions").exists()
    return m


def _committed_shards(root: Path, stage: str = "questions") -> list[Path]:
    ckpt = root / "_checkpoints" / stage
    return [f for f in ckpt.glob("*.parquet") if not f.name.endswith(".pending.parquet")] if ckpt.exists() else []


def _actors(address: str, class_part: str, alive: bool = False) -> list:
    """Actors whose class name contains `class_part`, from the GCS (Ray's state API)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(address=address, detail=True, limit=1000)
            if class_part in a.class_name and (not alive or a.state == "ALIVE")]


def _replica_actors(address: str, alive: bool = False) -> list:
    return _actors(address, "vLLMEngineStage", alive)


def _registered_checkpoint(run_dir: Path) -> bool:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def _training_worker_node(address: str) -> str:
    """The node of a live Ray Train worker that does not also hold the train controller."""
    controller = {a.node_id for a in _actors(address, "TrainController", alive=True)}
    nodes = sorted({a.node_id for a in _actors(address, "RayTrainWorker", alive=True)} - controller)
    assert nodes, "no training worker on a node of its own"
    return nodes[0]


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()).strip()[:120] or proc.name()
    except psutil.Error:
        return ""


def _run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["results"] = pipeline.run(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def test_autoscaling_pipeline_scales_engines_from_zero_to_max_and_back(cloud, tiny_model, tiny_reward, tmp_path):
    """questions -> language -> dedup -> difficulty -> responses -> reward -> selection with two
    engine replicas on the gpu_worker group: from 0 nodes to 2 (the group's max) when an engine
    stage starts, back to 0 after the idle timeout. The CPU stages run on 1-CPU cpu_workers (the
    head has no CPU)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    watch = NodeWatch()
    try:
        _no_engine_nodes(watch)
        assert watch.now().get("gpu_worker", 0) == 0
        root = tmp_path / "root"
        cfg = _config(tiny_model, root, **{
            # A pool of two replicas: Ray Data starts both, and each pending replica launches a
            # gpu_worker. A (1, 2) range was raced here: Ray Data grows a pool only within the
            # resources the cluster already has, after its own cluster autoscaler has asked for
            # more, and the tiny model's stage often ended before that (CI, 2026-12-02).
            "models.tiny.scale": {"batch_size": 4, "replicas": [2, 2], **ENGINE},
            "stages.questions.generators": [{"name": "tiny", "model": "tiny", "num_questions": 96}]})
        # The tiny model writes random text: the language filter keeps any language and any form.
        langs = sorted(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)
        cfg["models"]["reward"] = {"path": str(tiny_reward), "engine": {"dtype": "float32"},
                                   "scale": {"batch_size": 8, **ENGINE}}
        cfg["stages"].update({
            "language": {"languages": langs, "min_words": 1, "require_question": False},
            "dedup": {},
            "difficulty": {"model": "reward", "engine": "hf", "drop_easiest": 0.25},
            "reward": {"model": "reward", "engine": "hf", "max_length": 256},
            "selection": {}})
        cfg["stages"]["responses"]["n"] = 2
        cfg["pipeline"] = ["questions", "language", "dedup", "difficulty", "responses", "reward", "selection"]
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        started = time.time()
        pipeline.run(load_config(path))
        finished = time.time()
        # GCS's view: engine nodes launched from 0, up to the max of 2 for the pool's two replicas.
        assert [c.get("gpu_worker", 0) for t, c in watch.samples if t <= started][-1] == 0
        assert watch.most("gpu_worker", since=started) == 2
        assert watch.most("cpu_worker", since=started) >= 1
        _no_engine_nodes(watch, timeout=IDLE_MINUTES * 60 + 90)  # and back to 0 after the idle timeout
        scaled_down = time.time()
        assert len(watch.ids["gpu_worker"]) >= 2
    finally:
        watch.stop()
    print(f"autoscaling pipeline: {finished - started:.0f} s; engine nodes back to 0 "
          f"{scaled_down - finished:.0f} s after it finished")

    # Every id exactly once, stage to stage.
    questions = _ids(root, "questions")
    assert sorted(questions) == [f"tiny-{i:09d}" for i in range(96)]
    dedup_kept = set(pq.read_table(root / "dedup" / "data", columns=["query_id"])["query_id"].to_pylist())
    assert set(_ids(root, "difficulty")) == dedup_kept
    kept = set(pq.read_table(root / "difficulty" / "data", columns=["query_id"])["query_id"].to_pylist())
    assert kept and len(kept) < len(dedup_kept)  # the easiest quarter was sampled away
    responses = _ids(root, "responses", "response_id")
    assert sorted(responses) == sorted(f"{q}#{k}" for q in kept for k in range(2))
    kept_responses = pq.read_table(root / "responses" / "data", columns=["response_id"])["response_id"].to_pylist()
    assert sorted(_ids(root, "reward", "response_id")) == sorted(kept_responses)
    rewarded = pq.read_table(root / "reward" / "data", columns=["query_id"])["query_id"].to_pylist()
    assert sorted(_ids(root, "selection")) == sorted(set(rewarded))  # one row per question with a candidate

    # Where the work ran (Ray's state API): replicas and scorers on gpu_worker nodes only.
    placed = {key: {a.node_id for a in _actors(cloud.address, key)} for key in ("vLLMEngineStage", "Scorer")}
    assert all(placed.values())
    assert set().union(*placed.values()) <= watch.ids["gpu_worker"]
    # What each stage held, in its manifest (from the GCS tables).
    m = yaml.safe_load((root / "questions" / "_manifest.json").read_text())
    pool = m["resources"]["pools"]["MapBatches(vLLMEngineStageUDF)"]
    # Replicas counted while alive: a second one Ray Data asked for may come up only after the
    # 96 rows are done (then the autoscaler launched its node, but it never served), so 1 or 2.
    r = pool["replicas"]
    assert 1 <= r["min"] <= r["mean"] <= r["max"] <= 2 and pool["cpu_seconds"] > 0
    assert m["resources"]["node_seconds"]["gpu_worker"] > 0 and m["resources"]["node_seconds"]["cpu_worker"] > 0
    d = yaml.safe_load((root / "dedup" / "_manifest.json").read_text())
    # Dedup's shuffles ran on 1-CPU worker nodes (the head has none): cpu_workers, or the
    # gpu_workers still up from the engine stage before it (seen once locally: no cpu_worker then).
    assert sum(d["resources"]["node_seconds"].get(t, 0) for t in ("cpu_worker", "gpu_worker")) > 0


def test_a_stage_no_node_type_can_hold_fails_in_seconds(cloud, tiny_model, tmp_path):
    """A replica asking for more than any node type of the autoscaler has (4 CPUs; nodes have 1)
    fails before anything starts, in one line, instead of waiting forever."""
    cfg = _config(tiny_model, tmp_path / "root", **{"models.tiny.scale": {"batch_size": 4, "cpus_per_replica": 4}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    with pytest.raises(InputError) as err:
        pipeline.run(load_config(path))
    assert time.time() - t0 < 90  # one autoscaler update, or two when its loop is launching a node
    assert str(err.value).startswith("stages.questions: a vLLM replica of models.tiny needs CPU 4; no node of this "
                                     "cluster, and no node type of its autoscaler, has that")
    assert "\n" not in str(err.value) and not (tmp_path / "root" / "questions").exists()


def test_killed_replica_then_its_spot_node_taken_back(cloud, tiny_model, tmp_path):
    """Mid-stage, the replica's process is killed (Ray Data restarts the actor), then the cloud
    takes its node back (the provider terminates it, as a spot reclaim; any other engine node
    too): the autoscaler launches a replacement, the stage finishes, every id exactly once."""
    watch = NodeWatch()
    try:
        # No engine node left from an earlier test: the restarted replica must need a new one.
        _no_engine_nodes(watch)
        root = tmp_path / "root"
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(_config(tiny_model, root, **{
            "stages.questions.generators": [{"name": "tiny", "model": "tiny", "num_questions": 96}]})))
        thread, box = _run_in_thread(load_config(path))
        # ALIVE means the actor's __init__ (the engine load) is done and it is taking rows. Waiting
        # for a first shard instead raced the stage: the writes wait for a CPU node, so the first
        # shard can land when the last rows are already generated.
        victim = _wait(lambda: _replica_actors(cloud.address, alive=True), 300,
                       "the replica", poll=0.5)[0]
        time.sleep(3)  # mid-batch: 96 rows take the tiny engine about two minutes
        assert not (root / "questions" / "_manifest.json").exists(), "the stage finished before the kill"
        os.kill(victim.pid, signal.SIGKILL)  # the replica's process dies mid-stage
        restarted = _wait(lambda: [a for a in _replica_actors(cloud.address)
                                   if a.actor_id == victim.actor_id and a.num_restarts >= 1 and a.state == "ALIVE"],
                          240, "the restarted replica")
        assert restarted  # Ray Data restarted the actor
        before = set(watch.ids["gpu_worker"])
        host = restarted[0].node_id
        assert host in before
        # A second engine node (Ray Data's own autoscaler at times asks for more than the pool
        # holds) would take the restarted replica without a launch, and CI failed so: the cloud
        # takes any other engine node back first, so the replica must get a new one.
        for other in watch.alive("gpu_worker") - {host}:
            assert cloud.reclaim(node_id=other) == other
        assert cloud.reclaim(node_id=host) == host  # the cloud takes the replica's node back
        thread.join(600)
        assert not thread.is_alive() and "error" not in box, box.get("error")
        _assert_exactly_once(root, 96)
        assert set(watch.ids["gpu_worker"]) - before, "the autoscaler launched no replacement node"
    finally:
        watch.stop()


def test_spot_loss_of_a_training_node_resumes_from_the_checkpoint(cloud, tiny_model, tmp_path):
    """QFT on two workers pinned to gpu_worker nodes (one each: the nodes have 1 CPU). After the
    first checkpoint the cloud takes one node back: Ray Train restarts the worker group from that
    checkpoint on the replacement the autoscaler launches, and no local scratch is left."""
    from scalequest_ray.train import qft

    raw = _config(tiny_model, tmp_path / "root")
    raw["stages"] = {"seed_problems": {}, "qft": {
        "model": "tiny", "workers": 2, "batch_size": 8, "per_device_batch_size": 4, "max_examples": 128,
        "learning_rate": 1e-3, "save_steps": 4, "max_length": 128, "max_failures": 2,
        "resources": {"accelerator_type:A100": 0.001}}}
    raw["pipeline"] = ["seed_problems", "qft"]
    path = tmp_path / "qft.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    pipeline.run(cfg, stages=["seed_problems"])
    scratch = Path(tempfile.gettempdir()) / "scalequest-ray-train"
    leftovers = set(scratch.glob("qft-*"))
    watch = NodeWatch()
    box: dict = {}
    try:
        thread = threading.Thread(target=lambda: box.update(m=qft.run(cfg, Storage(cfg.root))), daemon=True)
        thread.start()
        ckpts = tmp_path / "root" / "qft" / "ray" / "run"
        # Registered, not only written: Ray Train resumes from the checkpoints its controller has
        # registered (in this snapshot), and a checkpoint folder appears a moment before that.
        _wait(lambda: _registered_checkpoint(ckpts), 300, "the first checkpoint", poll=0.05)
        before = set(watch.ids["gpu_worker"])
        # A node that holds a training worker: an earlier test's engine nodes may still be up and
        # idle, and taking one of those back would interrupt nothing.
        cloud.reclaim(node_id=_training_worker_node(cloud.address))
        thread.join(600)
        assert "m" in box, "QFT did not finish"
        assert set(watch.ids["gpu_worker"]) - before, "the autoscaler launched no replacement node"
    finally:
        watch.stop()
    metrics = box["m"]["metrics"]
    assert metrics["steps"] == 16
    assert 4 <= metrics["start_step"] < 16 and metrics["start_step"] % 4 == 0  # resumed from a checkpoint
    assert set(scratch.glob("qft-*")) - leftovers == set()


def test_killed_driver_resumes_without_regenerating_written_rows(cloud, tiny_model, tmp_path):
    root = tmp_path / "root"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_model, root)))
    env = {**os.environ, "RAY_ADDRESS": cloud.address}
    cmd = [f"{VENV_BIN}/scalequest-ray", "run", str(path)]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait(lambda: len(_committed_shards(root)) >= 2, 300, "committed shards", poll=0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (root / "questions" / "_manifest.json").exists(), "the stage finished before the kill"
    # What the killed attempt committed (read after the kill: nothing can commit any more).
    committed = set()
    for f in _committed_shards(root):
        committed.update(pq.read_table(f)["id"].to_pylist())
    assert 0 < len(committed) < NUM_Q

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taken over from an interrupted attempt" in done.stdout
    m = _assert_exactly_once(root)
    # The committed rows were kept, not generated again: only the rest was written now.
    assert m["resumed_rows"] == len(committed)
    assert m["rows_written"] == NUM_Q - len(committed)


def test_killed_driver_resumes_responses_over_a_user_file_with_a_repeated_id(tiny_model, tmp_path):
    """The responses stage over a user's file whose first and last rows share a query_id: the
    stage numbers its requests itself, so a killed attempt over such a file is continued too
    (it used to start over), and neither twin is lost or written twice.

    The CLI runs on its own 4-CPU local Ray with 2 one-CPU replicas (the rehearsal's set-up):
    resuming adds a checkpoint filter actor of 1 CPU per read (2 here), which left no CPU for
    the read tasks and hung; the rerun now runs 1 replica and says so. Only the driver is
    killed, and every process of its local Ray must end with it, the replicas' vLLM EngineCores
    included (scalequest_ray/lifeline.py)."""
    n_q = 2 * NUM_Q  # 256 candidates: the replicas generate for a while, and the kill lands while they do
    rows = [{"query_id": "twin" if i in (0, n_q - 1) else f"u{i:03d}", "query": f"What is {i} plus {i + 3}?"}
            for i in range(n_q)]
    src = tmp_path / "questions.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "root"
    cfg = _config(tiny_model, root, **{"stages.responses.input": str(src), "stages.responses.n": 2,
                                       "stages.responses.sampling": {"temperature": 0.7, "top_p": 0.95,
                                                                     "max_tokens": 32},
                                       "models.tiny.scale": {"batch_size": 4, "replicas": 2, "cpus_per_replica": 1}})
    cfg["pipeline"] = ["responses"]
    cfg["ray"] = {"num_cpus": 4}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [f"{VENV_BIN}/scalequest-ray", "run", str(path)]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    left, tree = [], []

    def engines_at_work() -> bool:
        """Shards committed while a replica's EngineCore runs (they end with the stage's rows)."""
        nonlocal tree
        if len(_committed_shards(root, "responses")) < 2:
            return False
        try:
            tree = psutil.Process(driver.pid).children(recursive=True)
            return any("EngineCore" in " ".join(p.cmdline()) for p in tree if p.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:  # a process ended while we looked: look again
            return False

    try:
        _wait(engines_at_work, 300, "committed shards while the engines run", poll=0.05)
    finally:
        # The driver's own local Ray is its process tree. Only the driver is killed, as the OOM
        # killer or a `kill -9` would: the rest must end with it. vLLM's EngineCores (children of
        # the replicas' workers) used to live on, spinning, until the lifeline plugin.
        try:
            tree = psutil.Process(driver.pid).children(recursive=True)
        except psutil.Error:  # the driver already ended: its local Ray went with it
            pass
        driver.kill()
        driver.wait()
        # Ray's dashboard and runtime-env agents try to report the raylet's end to the GCS, which
        # died with it, and give up after about a minute: they are not waited for (nor spinning).
        agents = [p for p in tree if _name(p) in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")]
        _, alive = psutil.wait_procs([p for p in tree if p not in agents], timeout=30)
        left = [_name(p) for p in alive]
        for proc in alive + agents:
            try:
                proc.kill()
            except psutil.Error:
                pass
    assert not left, f"processes outlived the killed driver: {left}"
    assert not (root / "responses" / "_manifest.json").exists(), "the stage finished before the kill"
    committed = sum(pq.ParquetFile(f).metadata.num_rows for f in _committed_shards(root, "responses"))
    assert 0 < committed < 2 * n_q

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taken over from an interrupted attempt" in done.stdout
    assert "stages.responses: 1 vLLM replica of models.tiny instead of 2: this cluster has 4 CPUs" in done.stdout
    written = sorted(_ids(root, "responses", "response_id"))
    expected = sorted(f"{r['query_id']}#{k}" for r in rows for k in range(2))  # the twins' ids twice each
    assert written == expected
    twins = [q for q, i in zip(_ids(root, "responses", "query"), _ids(root, "responses")) if i == "twin"]
    assert sorted(twins) == sorted([rows[0]["query"]] * 2 + [rows[-1]["query"]] * 2)
    m = yaml.safe_load((root / "responses" / "_manifest.json").read_text())
    assert m["resumed_rows"] == committed and m["rows_written"] == 2 * n_q - committed
    assert "request_no" not in pq.read_schema(next((root / "responses" / "data").glob("*.parquet"))).names


class FaultyS3Proxy:
    """An HTTP proxy in front of the moto server that answers some requests itself with an
    error: every `every`-th request a 503 SlowDown (transient), and with `deny` a 403 for PUTs
    whose path contains that string (permanent)."""

    def __init__(self, upstream: str, every: int = 0, deny: str | None = None):
        self.upstream = upstream.split("://", 1)[1]
        self.every, self.deny, self.count, self.injected = every, deny, 0, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str):
                proxy.injected += 1
                body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self):
                body = self._body()
                proxy.count += 1
                if proxy.deny and self.command == "PUT" and proxy.deny in self.path:
                    return self._error(403, "AccessDenied")
                if proxy.every and proxy.count % proxy.every == 0:
                    return self._error(503, "SlowDown")
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # no body, and Content-Length is the object's size
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def _s3_language_config(tmp_path, endpoint: str, bucket: str) -> Path:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    questions, _ = write_chain_inputs(tmp_path / "inputs")
    cfg = {"name": "s3faults", "root": f"s3://{bucket}/run", "seed": 1,
           "storage": {"rows_per_file": 2, "endpoint_url": endpoint},
           "stages": {"language": {"input": str(questions)}}, "pipeline": ["language"]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _s3_ids(storage: Storage) -> list:
    out = []
    for sub in ("data", "exclusions"):
        for f in storage.parquet_files(storage.path("language", sub)):
            out += pq.read_table(f, filesystem=storage.fs, columns=["query_id"])["query_id"].to_pylist()
    return out


@pytest.mark.s3
def test_s3_errors_are_retried_and_no_manifest_over_missing_shards(cloud, s3_server, tmp_path):
    expected = {qid for qid, _ in CHAIN_QUESTIONS}
    # Transient: every 4th request to S3 fails with 503 SlowDown; the stage still completes.
    flaky = FaultyS3Proxy(s3_server, every=4)
    try:
        cfg = load_config(_s3_language_config(tmp_path, flaky.url, "flaky"))
        pipeline.run(cfg)
        storage = Storage(cfg.root, s3_server)
        ids = _s3_ids(storage)
        assert len(ids) == len(set(ids)) and set(ids) == expected
        assert storage.manifest("language")["rows"] + storage.manifest("language")["excluded_rows"] == len(expected)
        assert flaky.injected >= 5
    finally:
        flaky.close()

    # Permanent: writes to language/data/ are refused; the stage fails and commits nothing.
    broken = FaultyS3Proxy(s3_server, deny="/language/data/")
    try:
        cfg = load_config(_s3_language_config(tmp_path / "b", broken.url, "broken"))
        with pytest.raises(Exception):
            pipeline.run(cfg)
        storage = Storage(cfg.root, s3_server)
        assert broken.injected >= 1
        assert storage.manifest("language") is None
    finally:
        broken.close()
    # The same run root through a healthy endpoint then finishes, every id once.
    healed = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"endpoint_url": s3_server})})
    pipeline.run(healed)
    ids = _s3_ids(Storage(cfg.root, s3_server))
    assert len(ids) == len(set(ids)) and set(ids) == expected


def test_ray_job_submit(cloud, tiny_model, tmp_path):
    """From a fresh shell: `ray job submit --working-dir .` streams the logs and returns the
    job's exit status (0 done; 2 for a config error found before anything starts). A successful
    job's log (questions on the engine group -> language -> dedup) is a console a person can read:
    no traceback, no ERROR line, the stages' own lines."""
    import re

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    root = tmp_path / "root"
    cfg = _config(tiny_model, root, **{
        "stages.questions.generators": [{"name": "tiny", "model": "tiny", "num_questions": 8}],
        "stages.questions.sampling": {"temperature": 1.0, "top_p": 0.99, "max_tokens": 16}})
    cfg["stages"].update({"language": {"languages": sorted(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes),
                                       "min_words": 1, "require_question": False}, "dedup": {}})
    cfg["pipeline"] = ["questions", "language", "dedup"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # the head's token authentication: the mode, and the cluster's own token (FakeCloud's file)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.environ["RAY_AUTH_TOKEN_PATH"])
    submit = [f"{VENV_BIN}/ray", "job", "submit", "--address", cloud.dashboard, "--working-dir", str(REPO), "--",
              "python", "ray_jobs/run_pipeline.py", "--config", str(path)]
    ok = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "[questions] done" in ok.stdout and "[dedup] done" in ok.stdout and "succeeded" in ok.stdout
    assert (root / "dedup" / "_manifest.json").exists()
    log = ok.stdout + ok.stderr
    noisy = [line for line in log.splitlines() if "Traceback" in line or re.search(r"\bERROR\b|\] E ", line)]
    assert noisy == [], noisy[:5]
    print(f"successful job: {len(log.splitlines())} console lines")

    bad = subprocess.run(submit + ["--set", "stages.language.min_words=-1"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0
    assert "min_words" in bad.stdout and "failed" in bad.stdout
