"""Where a vLLM stage's start-up goes on CPU: the questions stage on a few rows, its phases read
from the engine's own log lines (Ray's session logs) and from the driver's clock.

Phases: driver (tokenizer + chat template, Ray Data plan) -> replica actor up (process start and
imports, up to the engine's first log line) -> EngineCore process (spawned; imports vLLM and
torch again) -> model runner (with vLLM's multiprocessing executor, which vLLM picks on CPU, a third
process that imports everything again; see engine.cpu_engine_env) -> weights loaded -> KV cache + warm-up -> first batch through to the
committed manifest.

    python benchmarks/engine_start.py [--model PATH] [--rows 8]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalequest_ray import pipeline  # noqa: E402
from scalequest_ray.config import RunConfig  # noqa: E402
from scalequest_ray.models import demo_model_dir  # noqa: E402

LINE = re.compile(r"^\((\w+) pid=\d+\) \w+ (\d\d-\d\d \d\d:\d\d:\d\d) \[[^\]]+\] (.*)$")


def engine_events(logs: Path, since: float) -> dict:
    """First time of each engine milestone in the session's worker logs after `since`."""
    year = datetime.fromtimestamp(since).year
    marks = {"actor": r"Resolved architecture", "engine_core": r"Initializing a V1 LLM engine",
             "worker": r"Starting to load model", "weights": r"Loading weights took ([\d.]+)",
             "init": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)"}
    out: dict = {}
    for f in sorted(logs.glob("worker-*")):
        for line in f.read_text(errors="replace").splitlines():
            m = LINE.match(line)
            if not m:
                continue
            t = datetime.strptime(f"{year}-{m.group(2)}", "%Y-%m-%d %H:%M:%S").timestamp()
            if t < since - 1:
                continue
            for name, pattern in marks.items():
                hit = re.search(pattern, m.group(3))
                if hit and (name not in out or t < out[name][0]):
                    out[name] = (t, float(hit.group(1)) if hit.groups() else None)
    return out


def main():
    import ray

    from scalequest_ray.engine import chat_sampling

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(demo_model_dir()))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--root", default="/tmp/sq-engine-start")
    # Every CPU config runs eager (configs/demo.yaml, the tests); without it vLLM compiles the
    # model with inductor on CPU, 10-17 s per engine start here.
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (enforce_eager off)")
    args = ap.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False, log_to_driver=False)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    cfg = RunConfig.model_validate({
        "name": "start", "root": args.root,
        "models": {"m": {"path": args.model, "engine": {"max_model_len": 1024, "cpu_kv_cache_gib": 1, "max_num_seqs": 64,
                                                        "enforce_eager": not args.compile}}},
        "stages": {"questions": {"generators": [{"name": "g", "model": "m", "num_questions": args.rows}],
                                 "sampling": {"max_tokens": 32}}},
        "pipeline": ["questions"],
    })
    t0 = time.time()
    chat_sampling(cfg.models["m"], cfg.stages.questions.sampling)
    tokenizer_s = time.time() - t0
    start = time.time()
    result = pipeline.run(cfg, echo=lambda _: None)[0]
    end = time.time()
    ev = engine_events(logs, start)
    ray.shutdown()

    def at(name):
        return ev[name][0] if name in ev else None

    phases = [
        ("driver: tokenizer + chat template (measured alone)", tokenizer_s),
        ("stage start -> replica actor's first engine log (actor process, imports)", at("actor") and at("actor") - start),
        ("-> EngineCore process up (spawned, imports vLLM/torch)", at("engine_core") and at("actor") and at("engine_core") - at("actor")),
        ("-> model runner up (a third process only with vLLM's multiprocessing executor)", at("worker") and at("engine_core") and at("worker") - at("engine_core")),
        ("   weights loaded (vLLM's own figure)", ev.get("weights", (0, None))[1]),
        ("   KV cache + profile + warm-up (vLLM's own figure)", ev.get("init", (0, None))[1]),
        ("engine ready -> manifest (first batch, generation, writes, commit)", at("init") and end - at("init")),
        ("stage total (driver clock)", end - start),
    ]
    for name, value in phases:
        print(f"{name:<76} {'n/a' if value is None else f'{value:6.1f} s'}")
    m = result.manifest
    print(f"rows {m['rows'] + m['excluded_rows']}, model {args.model}")


if __name__ == "__main__":
    main()
