"""Reward scoring throughput: our batched Ray Data actor pool vs the reference's way (a plain HF
model, batch size 1, one process), same model, same rows, one run, side by side.

The model is the demo's reward model (SmolLM2-135M + a one-output head, 135M parameters); the
rows are (question, response) pairs of realistic, varied length built from a fixed seed. Both
sides score the chat-formatted pair with the same tokenizer and truncation; the scores are
compared row by row, so the speed-up is not bought with different results.

    python benchmarks/reward_batching.py [--rows 512] [--batch 16] [--replicas 2]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalequest_ray.models import DEMO_MODEL_NAME, build_scorer_model, cache_dir, fetch_demo_model  # noqa: E402

WORDS = ("apples pencils train farmer tank litres kilometres rectangle triangle angle sum product price discount "
         "profit hours minutes speed ratio average").split()


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 500), rng.randint(2, 90)
        q = (f"A shop has {a} {rng.choice(WORDS)} and sells {b} of them each day. "
             + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + f" How many are left after {i % 7 + 1} days?")
        steps = [f"Step {k + 1}: {rng.choice(WORDS)} {rng.randint(1, 999)} {rng.choice(WORDS)}." for k in range(rng.randint(2, 25))]
        out.append({"query": q, "response": " ".join(steps) + f" The answer is \\boxed{{{a - b}}}."})
    return out


def reference(model_dir: str, data: list[dict]) -> tuple[list[float], float]:
    """The reference's loop: one process, one row per forward pass."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.time()
    scores = []
    with torch.inference_mode():
        for r in data:
            chat = [{"role": "user", "content": r["query"]}, {"role": "assistant", "content": r["response"]}]
            enc = tok(tok.apply_chat_template(chat, tokenize=False), return_tensors="pt", truncation=True,
                      max_length=1024, add_special_tokens=False)
            scores.append(float(model(**enc).logits[0, 0]))
    return scores, time.time() - t0


def ours(model_dir: str, data: list[dict], batch: int, replicas: int) -> tuple[list[float], float]:
    import ray

    from scalequest_ray.scoring import Scorer

    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False, log_to_driver=False)
    threads = max(1, (os.cpu_count() or 1) // replicas)
    kw = dict(model_path=model_dir, endpoint=None, out="reward", pairs=True, method="sequence_classification",
              max_length=1024, dtype="float32", trust_remote_code=False, device_batch=batch, threads=threads)
    ds = ray.data.from_items([dict(r, idx=i) for i, r in enumerate(data)], override_num_blocks=max(1, len(data) // (4 * batch)))

    def run(d):
        return d.map_batches(Scorer, batch_format="pyarrow", batch_size=4 * batch, concurrency=replicas,
                             num_cpus=1, fn_constructor_kwargs=kw).select_columns(["idx", "reward"])

    run(ray.data.from_items([dict(r, idx=i) for i, r in enumerate(data[:replicas * 4])])).materialize()  # load the model in each actor, not timed
    t0 = time.time()
    # Small benchmark output (an index and a float per row): fine to collect here.
    out = sorted(run(ds).take_all(), key=lambda r: r["idx"])
    elapsed = time.time() - t0
    ray.shutdown()
    return [r["reward"] for r in out], elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args()
    model_dir = str(build_scorer_model(cache_dir() / "models" / f"{DEMO_MODEL_NAME}-reward-init", fetch_demo_model()))
    data = rows(args.rows)
    ref_scores, ref_s = reference(model_dir, data)
    our_scores, our_s = ours(model_dir, data, args.batch, args.replicas)
    diff = max(abs(a - b) for a, b in zip(ref_scores, our_scores))
    print(f"rows: {len(data)}   model: {model_dir}")
    print(f"reference (HF, batch 1, one process): {ref_s:8.1f} s  {len(data) / ref_s:7.1f} rows/s")
    print(f"ours (Ray Data actor pool, {args.replicas} replicas, batch {args.batch}): {our_s:8.1f} s  {len(data) / our_s:7.1f} rows/s")
    print(f"speed-up: {ref_s / our_s:.2f}x   max |score difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
