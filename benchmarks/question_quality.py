"""Question quality of the base generator vs its QFT and QPO versions, side by side.

Runs (or reuses) the demo chain seed_problems -> qft -> qpo_pairs -> qpo under --root, then has
each model write --n questions through our question stage with the SAME generator name, seed
and sampling (so row i gets the same prompt and seed for every model), and prints for each: the
share of well-formed English math questions (py3langid says English, asks something, has a
number, 8-150 words, no code), the distinct-4-gram ratio, and the mean length in words.

    python benchmarks/question_quality.py [--root runs/quality] [--n 200] [--max-tokens 160]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scalequest_ray import pipeline  # noqa: E402
from scalequest_ray.config import load_config  # noqa: E402
from scalequest_ray.quality import summarize  # noqa: E402
from scalequest_ray.storage import InputError, Storage  # noqa: E402


def texts(root: Path) -> list[str]:
    import pandas as pd

    frames = [pd.read_parquet(f) for sub in ("data", "exclusions") for f in sorted((root / "questions" / sub).glob("*.parquet"))]
    return [q for f in frames for q in f["query"].fillna("")]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO / "runs" / "quality"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--set", action="append", default=[], help="extra config overrides for the chain")
    args = p.parse_args()
    root = Path(args.root).absolute()

    chain = load_config(REPO / "configs" / "demo.yaml", [f"root={root}/chain", "pipeline=[seed_problems,qft,qpo_pairs,qpo]", *args.set])
    try:
        pipeline.run(chain)
    except InputError as e:  # e.g. the offline optimizer produced no usable pair
        print(f"chain stopped: {e}")
    storage = Storage(str(root / "chain"))
    models = {"base": chain.models["smollm2"].path}
    for stage in ("qft", "qpo"):
        manifest = storage.manifest(stage)
        if manifest:
            models[stage] = manifest["model"]

    rows = {}
    for label, path in models.items():
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"root={root}/{label}", f"models.smollm2.path={path}", "pipeline=[questions]",
            "stages.questions.generators.0.name=bench", f"stages.questions.generators.0.num_questions={args.n}",
            f"stages.questions.sampling.max_tokens={args.max_tokens}",
        ])
        pipeline.run(cfg)
        rows[label] = summarize(texts(root / label))

    print(f"\n{args.n} questions per model, same prompts/seeds/sampling (T 1.0, top_p 0.99, max {args.max_tokens} tokens)")
    print(f"{'model':6} {'well-formed':>12} {'distinct-4g':>12} {'mean words':>11}  rejected by reason")
    for label, s in rows.items():
        print(f"{label:6} {s['wellformed_share']:>12.3f} {s['distinct_4gram_ratio']:>12.3f} {s['mean_words']:>11.1f}  {s['rejected_by_reason']}")
    for label in ("qft", "qpo"):
        if label not in rows:
            print(f"{label}: no model (its stage did not finish; see above)")


if __name__ == "__main__":
    main()
