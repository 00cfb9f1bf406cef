"""What a CPU stage costs besides its rows: the language, dedup and selection stages on 32 rows
and on 100,000 rows, in one run, with Ray already started. Seconds per stage are the manifest's
(from the stage's start to its committed manifest).

Questions are the synthetic ones of cpu_stages_scale.py (a real math vocabulary, 5% exact and 5%
near copies planted). Selection reads candidates: 4 per question, each with an answer and a
reward, so its groupby, majority vote and best-of-n all run.

    python benchmarks/stage_overhead.py [--sizes 32,100000] [--root /tmp/sq-overhead]

Last line: fixed_cost_s=<median of the three stages at the smallest size>
rows_per_s_100k=<rows through language + dedup + selection per second of their summed time at 100K>
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_stages_scale import make, vocabulary  # noqa: E402

from scalequest_ray import pipeline  # noqa: E402
from scalequest_ray.config import RunConfig  # noqa: E402

STAGES = ("language", "dedup", "selection")


def candidates(batch: dict) -> dict:
    """4 candidates per question id: answers agree 3 of 4 times, rewards differ."""
    ids = [int(i) for i in batch["id"]]
    return {
        "query_id": [f"s-{i // 4:09d}" for i in ids],
        "query": [f"Question {i // 4}: how many apples are left?" for i in ids],
        "response": [f"Step by step ... the answer is {i // 4 + (i % 4 == 3)}" for i in ids],
        "answer": [str(i // 4 + (i % 4 == 3)) for i in ids],
        "reward": [((i * 7919) % 1000) / 1000 for i in ids],
        "sample_idx": [i % 4 for i in ids],
    }


def run_size(n: int, base: Path, vocab: list[str]) -> dict:
    import ray

    root = base / str(n)
    shutil.rmtree(root, ignore_errors=True)
    questions, cands = str(root / "questions"), str(root / "candidates")
    blocks = max(1, n // 20000)
    ray.data.range(n, override_num_blocks=blocks).map_batches(make, fn_kwargs={"vocab": vocab}) \
        .write_parquet(questions, min_rows_per_file=20000)
    ray.data.range(n, override_num_blocks=blocks).map_batches(candidates).write_parquet(cands, min_rows_per_file=20000)
    cfg = RunConfig.model_validate({
        "name": "overhead", "root": str(root / "run"), "storage": {"rows_per_file": 50000},
        "stages": {"language": {"input": questions}, "dedup": {}, "selection": {"input": cands}},
        "pipeline": list(STAGES),
    })
    seconds = {}
    for result in pipeline.run(cfg, echo=lambda _: None):
        m = result.manifest
        seconds[result.stage] = m["seconds"]
        print(f"{n:>8} rows  {result.stage:<10} {m['seconds']:7.2f} s  in {m['rows_in'] or m['rows'] + m['excluded_rows']:>7}"
              f"  kept {m['rows']:>7}  {m['excluded_by_reason']}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return seconds


def main():
    import ray

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,100000")
    ap.add_argument("--root", default="/tmp/sq-overhead")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False, log_to_driver=False)
    vocab = vocabulary()
    t0 = time.time()
    by_size = {n: run_size(n, Path(args.root), vocab) for n in sizes}
    ray.shutdown()
    small, large = by_size[min(sizes)], by_size[max(sizes)]
    fixed = statistics.median(small[s] for s in STAGES)
    # Rows through the three stages (each stage's input counts) per second of their summed time.
    rate = 3 * max(sizes) / sum(large[s] for s in STAGES)
    print(f"(whole benchmark {time.time() - t0:.0f} s)")
    print(f"fixed_cost_s={fixed:.2f} rows_per_s_100k={rate:.0f}")


if __name__ == "__main__":
    main()
