"""How much CPU QFT the demo needs: the demo's seed problems -> QFT with the given settings ->
questions from the QFT'd model, and the share of well-formed math questions among them
(quality.wellformed_reason), next to the QFT's wall time.

    python benchmarks/qft_demo.py --root /tmp/qft-demo [--n 64] [--set stages.qft.workers=1 ...]

Last line: `qft_s=<seconds> steps=<n> wellformed_share=<share of --n questions>`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scalequest_ray import pipeline  # noqa: E402
from scalequest_ray.config import load_config  # noqa: E402
from scalequest_ray.quality import summarize  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/qft-demo")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--set", action="append", default=[], help="config overrides for the QFT")
    args = p.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={args.root}", "pipeline=[seed_problems,qft,questions]",
        "stages.questions.generators.0.model=smollm2_qft", f"stages.questions.generators.0.num_questions={args.n}",
        f"stages.questions.sampling.max_tokens={args.max_tokens}", *args.set])
    t0 = time.time()
    results = pipeline.run(cfg, stages=["seed_problems", "qft"])
    qft_s = results[-1]["seconds"]
    pipeline.run(cfg, stages=["questions"])
    import pandas as pd

    q = Path(args.root) / "questions"
    texts = [t for sub in ("data", "exclusions") for f in sorted((q / sub).glob("*.parquet"))
             for t in pd.read_parquet(f)["query"].fillna("")]
    s = summarize(texts)
    for t in texts[:6]:
        print("  ", repr(t[:160]))
    print(s)
    m = results[-1]["metrics"]
    print(f"total {time.time() - t0:.0f} s; loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}")
    print(f"qft_s={qft_s:.1f} steps={m['steps']} wellformed_share={s['wellformed_share']:.3f}")


if __name__ == "__main__":
    main()
