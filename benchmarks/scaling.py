"""Multi-node figures on one machine, measured side by side in one run (ray.cluster_utils: a head
and worker raylets, each its own raylet + object store, as on a cluster):

1. The CPU stages (language filter + exact + near dedup) on N synthetic questions with 1 worker
   raylet vs 2 worker raylets of 2 CPUs each (the head schedules nothing): rows/s and the
   scaling efficiency (speed-up / 2). (With 1 CPU per raylet, dedup's key actor holds the only
   CPU and the shuffle tasks wait for it forever: a deadlock found by this benchmark.)
2. The questions stage on the tiny test model, undisturbed vs with the vLLM replica's process
   killed after the first shard is written: the extra seconds, and the rows generated twice
   (rows in the engine tasks that Ray retried, from Ray's own task records: attempt > 0).

    python benchmarks/scaling.py [--rows 100000] [--questions 160] [--root /tmp/sq-scaling]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_stages_scale  # noqa: E402
from cpu_stages_scale import make, vocabulary  # noqa: E402

from scalequest_ray import pipeline  # noqa: E402
from scalequest_ray.config import RunConfig  # noqa: E402
from scalequest_ray.models import build_tiny_model, cache_dir, fetch_demo_model  # noqa: E402

STORE = 300 * 2**20
# Ray's workers cannot import benchmarks/: ship the row maker by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(cpu_stages_scale)


def cluster(workers: int, cpus: int, **resources):
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1", "object_store_memory": STORE})
    for _ in range(workers):
        c.add_node(num_cpus=cpus, object_store_memory=STORE, resources=resources or None)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    return c


def close(c) -> None:
    import ray

    ray.shutdown()
    c.shutdown()


def cpu_stages(workers: int, rows: int, root: Path) -> float:
    """Seconds for language + dedup over `rows` rows on `workers` raylets of 2 CPUs."""
    import ray

    c = cluster(workers, 2)
    try:
        shutil.rmtree(root, ignore_errors=True)
        inputs = str(root / "input")
        ray.data.range(rows, override_num_blocks=max(2, rows // 10000)).map_batches(
            make, fn_kwargs={"vocab": vocabulary()}).write_parquet(inputs, min_rows_per_file=10000)
        cfg = RunConfig.model_validate({
            "name": "scaling", "root": str(root / "run"), "storage": {"rows_per_file": 25000},
            "stages": {"language": {"input": inputs}, "dedup": {"num_partitions": 2 * workers}},
            "pipeline": ["language", "dedup"],
        })
        t0 = time.time()
        pipeline.run(cfg, echo=lambda _: None)
        return time.time() - t0
    finally:
        close(c)
        shutil.rmtree(root, ignore_errors=True)


def questions_run(model: Path, n: int, root: Path, kill: bool) -> tuple[float, int]:
    """(seconds, rows generated twice) for the questions stage, optionally killing the replica."""
    from ray.util.state import list_actors, list_tasks

    c = cluster(1, 2, engine=1)
    try:
        shutil.rmtree(root, ignore_errors=True)
        cfg = RunConfig.model_validate({
            "name": "scaling-q", "root": str(root), "seed": 1, "storage": {"rows_per_file": 4},
            "models": {"tiny": {"path": str(model),
                                "engine": {"max_model_len": 512, "enforce_eager": True, "cpu_kv_cache_gib": 1},
                                "scale": {"batch_size": 4, "resources": {"engine": 1}}}},
            "stages": {"questions": {"generators": [{"name": "tiny", "model": "tiny", "num_questions": n}],
                                     "sampling": {"temperature": 1.0, "top_p": 0.99, "max_tokens": 48},
                                     "min_chars": 1}},
            "pipeline": ["questions"],
        })
        box: dict = {}
        t0 = time.time()
        t = threading.Thread(target=lambda: box.update(r=pipeline.run(cfg, echo=lambda _: None)), daemon=True)
        t.start()
        if kill:
            while not list((root / "questions" / "_staging").glob("*.parquet")):
                time.sleep(0.1)
            victim = [a for a in list_actors(detail=True, limit=1000)
                      if "vLLMEngineStage" in a.class_name and a.state == "ALIVE"][0]
            os.kill(victim.pid, signal.SIGKILL)
        t.join()
        seconds = time.time() - t0
        m = box["r"][0].manifest
        assert m["rows"] + m["excluded_rows"] == n, m
        retried = [x for x in list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
                   if "vLLMEngineStage" in (x.name or "") and (x.attempt_number or 0) > 0]
        return seconds, len(retried) * 4
    finally:
        close(c)
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--questions", type=int, default=160)
    ap.add_argument("--root", default="/tmp/sq-scaling")
    args = ap.parse_args()
    root = Path(args.root)

    one = cpu_stages(1, args.rows, root / "cpu1")
    two = cpu_stages(2, args.rows, root / "cpu2")
    print(f"CPU stages, {args.rows} rows: 1 raylet {one:.1f} s ({args.rows / one:.0f} rows/s), "
          f"2 raylets {two:.1f} s ({args.rows / two:.0f} rows/s): speed-up {one / two:.2f}x, "
          f"efficiency {one / two / 2:.0%}", flush=True)

    model = build_tiny_model(cache_dir() / "models" / "tiny-llama-test", tokenizer_from=fetch_demo_model())
    base, _ = questions_run(model, args.questions, root / "q0", kill=False)
    hit, again = questions_run(model, args.questions, root / "q1", kill=True)
    print(f"questions stage, {args.questions} rows: undisturbed {base:.1f} s, replica killed after the first shard "
          f"{hit:.1f} s: +{hit - base:.1f} s, {again} rows generated twice (retried engine tasks x batch 4); "
          f"every row once in the output", flush=True)


if __name__ == "__main__":
    main()
