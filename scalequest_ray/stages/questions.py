"""Question generation (ScaleQuest stage 3): a generator model writes the user turn itself.

The prompt is only the generator's chat template up to where the user's text starts; the model
continues with a question and stops at the end-of-turn marker. Diversity comes from sampling
alone, so every row gets its own seed derived from (run seed, generator, row index).
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa

from ..config import RunConfig
from ..engine import GENERATION_FIELDS, build_llm, engine_result, keep_all
from ..models import load_tokenizer
from ..runner import REASON, TOKENS
from ..storage import Storage
from ..text import derive_seed, stop_criteria, turn_template

SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("query", pa.string()),
    ("generator", pa.string()),
    ("generator_model", pa.string()),
    *GENERATION_FIELDS,
])


class _Prompt:
    """Row -> engine request. A class (not a closure) so Ray pickles only these few fields."""

    def __init__(self, run_seed, generator, model_path, prefix, sampling):
        self.run_seed, self.generator, self.model_path = run_seed, generator, model_path
        self.prefix, self.sampling = prefix, sampling

    def __call__(self, row: dict) -> dict:
        i = int(row["id"])
        seed = derive_seed(self.run_seed, "questions", self.generator, i)
        return {
            "query_id": f"{self.generator}-{i:09d}",
            "seed": seed,
            "prompt": self.prefix,
            "sampling_params": {**self.sampling, "seed": seed},
        }


def finalize(batch: pd.DataFrame, generator: str, model_path: str, sampling: dict, stop_ids: list,
             max_model_len: int, min_chars: int) -> pa.Table:
    """Engine output -> question rows, with a reason on the rows to exclude."""
    rows = []
    sampling_json = json.dumps(sampling, sort_keys=True)
    for r in batch.to_dict("records"):
        out = engine_result(r, sampling["max_tokens"], max_model_len, stop_ids)
        text = (out["text"] or "").strip()
        reason = ("engine_error" if out["error"] else "truncated" if out["finish_reason"] == "length"
                  else "empty" if len(text) < min_chars else None)
        rows.append({
            "query_id": r["query_id"], "query": text, "generator": generator, "generator_model": model_path,
            "seed": int(r["seed"]), "sampling": sampling_json, "finish_reason": out["finish_reason"],
            "num_input_tokens": out["num_input_tokens"], TOKENS: out["num_output_tokens"], REASON: reason,
            "error": out["error"],
        })
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def build(cfg: RunConfig, storage: Storage):
    import ray

    qcfg = cfg.stages.questions
    parts = []
    for gen in qcfg.generators:
        model = cfg.models[gen.model]
        tokenizer = load_tokenizer(model.path, cfg.storage.endpoint_url)
        turn = turn_template(tokenizer)
        stops, stop_strings = stop_criteria(tokenizer, turn.end_of_turn)
        sampling = {
            "temperature": qcfg.sampling.temperature,
            "top_p": qcfg.sampling.top_p,
            "max_tokens": qcfg.sampling.max_tokens,
            "stop_token_ids": stops,
            "stop": stop_strings,
        }
        processor = build_llm(model, _Prompt(cfg.seed, gen.name, model.path, turn.prefix, sampling), keep_all, cfg.storage.endpoint_url)
        blocks = max(1, min(gen.num_questions // max(model.scale.batch_size, 1), 1000))
        ds = processor(ray.data.range(gen.num_questions, override_num_blocks=blocks))
        parts.append(ds.map_batches(
            finalize,
            batch_format="pandas",
            fn_kwargs=dict(generator=gen.name, model_path=model.path, sampling=sampling, stop_ids=stops,
                           max_model_len=model.engine.max_model_len, min_chars=qcfg.min_chars),
        ))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
