"""Throughput of our question-generation stage vs raw vLLM, side by side in one process.

Same model, same prompts (the generator's user-turn prefix), same sampling and per-row seeds:
  (a) raw `vllm.LLM.generate` on all prompts at once;
  (b) our Ray Data stage (ray.data.llm actor pool -> finalize -> sharded Parquet + manifest).
Engine start-up is excluded from both: (a) times only `generate`; for (b) the wall time of a
1-row, 1-token run of the same stage (engine start, Ray Data plumbing, writes) is subtracted.

    python benchmarks/generation_overhead.py [--questions 512] [--max-tokens 128] [--model DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalequest_ray.config import load_config  # noqa: E402
from scalequest_ray.models import demo_model_dir, load_tokenizer  # noqa: E402
from scalequest_ray.text import derive_seed, stop_criteria, turn_template  # noqa: E402


def stage_config(root: str, model: str, n: int, max_tokens: int):
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"root={root}", f"models.smollm2.path={model}", f"stages.questions.generators.0.num_questions={n}",
        f"stages.questions.sampling.max_tokens={max_tokens}", "models.smollm2.scale.batch_size=64",
        "pipeline=[questions]",
    ])


def raw_vllm(cfg, n: int) -> tuple[int, float]:
    from vllm import LLM, SamplingParams

    from scalequest_ray.engine import engine_kwargs

    model = cfg.models["smollm2"]
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(model.engine.cpu_kv_cache_gib)
    tok = load_tokenizer(model.path)
    turn = turn_template(tok)
    stops, stop_strings = stop_criteria(tok, turn.end_of_turn)
    s = cfg.stages.questions.sampling
    params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                             stop_token_ids=stops, stop=stop_strings,
                             seed=derive_seed(cfg.seed, "questions", "smollm2", i)) for i in range(n)]
    kwargs = engine_kwargs(model)
    kwargs.pop("tensor_parallel_size")
    llm = LLM(model=model.path, **kwargs)
    start = time.perf_counter()
    outputs = llm.generate([turn.prefix] * n, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.engine_core.shutdown()
    del llm, outputs
    gc.collect()
    return tokens, elapsed


def our_stage(cfg) -> tuple[int, float]:
    from scalequest_ray import pipeline

    start = time.perf_counter()
    result = pipeline.run(cfg, stages=["questions"], force=True, echo=lambda line: print("  " + line))[0]
    return result.manifest["output_tokens"], time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default=str(demo_model_dir()))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = stage_config(f"{tmp}/bench", args.model, args.questions, args.max_tokens)
        print(f"model {args.model}, {args.questions} questions, max_tokens {args.max_tokens}, {os.cpu_count()} cores")
        raw_tokens, raw_s = raw_vllm(cfg, args.questions)
        print(f"(a) raw vllm.LLM.generate: {raw_tokens} tokens in {raw_s:.1f} s = {raw_tokens / raw_s:.1f} tok/s")

        from scalequest_ray.engine import init_ray

        init_ray(cfg)
        _, fixed_s = our_stage(stage_config(f"{tmp}/calib", args.model, 1, 1))
        our_tokens, our_total = our_stage(cfg)
        our_s = our_total - fixed_s
        print(f"(b) our Ray Data stage: {our_tokens} tokens in {our_total:.1f} s wall - {fixed_s:.1f} s "
              f"start-up = {our_s:.1f} s = {our_tokens / our_s:.1f} tok/s")
        ratio = (our_tokens / our_s) / (raw_tokens / raw_s)
        print(f"ratio (b)/(a) = {ratio:.2f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
