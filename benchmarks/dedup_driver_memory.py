"""Dedup alone over a run's language output, twice side by side, each in a fresh driver: with
Ray Data's plain groupby (its sort shuffle cuts each of n input blocks into n pieces, n^2 objects
owned by the driver, whatever num_partitions says) and with scalequest_ray.shuffle.groupby (the
blocks coalesced to the partition count first). Prints each side's driver peak RSS, its private
part (RssAnon), wall seconds and verdicts, then the ratios.

    python benchmarks/dedup_driver_memory.py [--language /tmp/sq-rehearsal/1M/run/language]

The default input is the 1M rehearsal's language output (453,302 questions; benchmarks/rehearsal.py).
Last line: driver_peak_ratio=<coalesced/plain> seconds_ratio=<coalesced/plain> same_verdicts=<bool>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def one_side(language: Path, work: Path, plain: bool) -> dict:
    import ray

    import rehearsal
    from scalequest_ray import pipeline, shuffle
    from scalequest_ray.config import RunConfig
    from scalequest_ray.engine import configure_data_context
    from scalequest_ray.models import cache_dir

    if plain:
        shuffle.groupby = lambda ds, key, num_partitions: ds.groupby(key, num_partitions=num_partitions)
    shutil.rmtree(work, ignore_errors=True)
    (work / "run").mkdir(parents=True)
    shutil.copytree(language, work / "run" / "language")
    models = {m: cache_dir() / "models" / m for m in ("tiny-llama-rehearsal", "tiny-llama-test", "tiny-llama-reward-test")}
    cfg = RunConfig.model_validate(rehearsal.config(
        work / "run", dict(zip(("writer", "solver", "reward"), models.values())), 1, None, ["language", "dedup"],
        20000, 2))
    configure_data_context()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rss = rehearsal.PeakRSS()
    rss.take()
    t0 = time.time()
    m = pipeline.run(cfg, stages=["dedup"], echo=lambda _: None)[0].manifest
    seconds = time.time() - t0
    peak = rss.take()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return {"peak_mib": peak / 2**20, "own_mib": rss.own / 2**20, "seconds": seconds, "rows": m["rows"],
            "excluded": m["excluded_by_reason"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--language", default="/tmp/sq-rehearsal/1M/run/language", help="a run's language stage folder")
    ap.add_argument("--work", default="/tmp/sq-dedup-memory")
    ap.add_argument("--side", choices=("plain", "coalesced"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(one_side(Path(args.language), Path(args.work), args.side == "plain")))
        return
    out = {}
    for side in ("plain", "coalesced"):
        done = subprocess.run([sys.executable, __file__, "--language", args.language, "--work", args.work, "--side", side],
                              capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        out[side] = r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{side:>9}: driver peak {r['peak_mib']:6.0f} MiB (own {r['own_mib']:6.0f})  {r['seconds']:6.0f} s  "
              f"kept {r['rows']}  {r['excluded']}", flush=True)
    p, c = out["plain"], out["coalesced"]
    same = (p["rows"], p["excluded"]) == (c["rows"], c["excluded"])
    print(f"driver_peak_ratio={c['peak_mib'] / p['peak_mib']:.2f} seconds_ratio={c['seconds'] / p['seconds']:.2f} "
          f"same_verdicts={same}")


if __name__ == "__main__":
    main()
