"""Question generation from a generator's bare user-turn prefix, as a Ray Dataset.

Shared by the questions stage and the QPO pair stage. The prompt is only the generator's chat
template up to where the user's text starts; the model continues with a question and stops at
the end-of-turn marker. Diversity comes from sampling alone, so every row gets its own seed
derived from (run seed, tag, generator, row index).
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa

from .config import ModelConfig, RunConfig, SamplingConfig
from .engine import GENERATION_FIELDS, build_llm, chat_sampling, engine_result, keep_all
from .columns import REASON, TOKENS
from .text import derive_seed

SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("query", pa.string()),
    ("generator", pa.string()),
    ("generator_model", pa.string()),
    *GENERATION_FIELDS,
    ("id", pa.int64()),  # the row's number over all generators: the questions stage's resume id
])


class _Prompt:
    """Row -> engine request. A class (not a closure) so Ray pickles only these few fields."""

    def __init__(self, run_seed, tag, generator, prefix, sampling, offset=0):
        self.run_seed, self.tag, self.generator = run_seed, tag, generator
        self.prefix, self.sampling, self.offset = prefix, sampling, offset

    def __call__(self, row: dict) -> dict:
        i = int(row["id"]) - self.offset  # the row's number within this generator
        seed = derive_seed(self.run_seed, self.tag, self.generator, i)
        return {
            "id": int(row["id"]),
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
            "error": out["error"], "id": int(r["id"]),
        })
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def generate_questions(cfg: RunConfig, name: str, model: ModelConfig, num_questions: int,
                       sampling_cfg: SamplingConfig, min_chars: int, tag: str = "questions", offset: int = 0):
    """(Ray Dataset of question rows with exclude_reason, the generator's turn prefix).

    Rows are numbered offset .. offset + num_questions - 1 in the `id` column (generators of one
    stage get disjoint ranges), read from `ray.data.range` so that Ray Data's checkpointing can
    filter already-written ids at the read."""
    import ray
    from ray.data.expressions import col

    turn, stops, sampling = chat_sampling(model, sampling_cfg, cfg.storage.endpoint_url)
    processor = build_llm(model, _Prompt(cfg.seed, tag, name, turn.prefix, sampling, offset), keep_all,
                          cfg.storage.endpoint_url)
    blocks = max(1, min((offset + num_questions) // max(model.scale.batch_size, 1), 1000))
    rows = ray.data.range(offset + num_questions, override_num_blocks=blocks)
    if offset:
        rows = rows.filter(expr=col("id") >= offset)
    ds = processor(rows)
    return ds.map_batches(
        finalize,
        batch_format="pandas",
        fn_kwargs=dict(generator=name, model_path=model.path, sampling=sampling, stop_ids=stops,
                       max_model_len=model.engine.max_model_len, min_chars=min_chars),
    ), turn.prefix
