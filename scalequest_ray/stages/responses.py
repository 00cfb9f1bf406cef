"""Response generation (ScaleQuest stage 5): the solver writes n step-by-step candidates per question.

Input is any dataset with a `query` column: the questions stage of this run, or the user's own
Parquet/JSONL, local or on S3. Each question becomes n engine requests (one per `sample_idx`,
each with its own derived seed) instead of one request with vLLM's `n`: Ray Data LLM keeps only
the first output of a request, so `n > 1` would silently lose candidates. vLLM's prefix cache
shares the question's KV cache between the n requests, which is what `n` would have bought.
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa

from ..config import RunConfig
from ..engine import GENERATION_FIELDS, build_llm, chat_sampling, engine_result, keep_all
from ..columns import REASON, TOKENS, stable_query_id
from ..runner import WORK
from ..stage import Stage, StageInput
from ..storage import InputError, Storage, read_input
from ..text import derive_seed, extract_answer, solver_user_text

SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("response_id", pa.string()),  # <query_id>#<sample_idx>: unique per candidate
    ("sample_idx", pa.int64()),
    ("query", pa.string()),
    ("response", pa.string()),
    ("answer", pa.string()),
    ("answer_format", pa.string()),
    ("solver_model", pa.string()),
    *GENERATION_FIELDS,
    ("request_no", pa.int64()),  # the stage's resume id (private: not in the output)
])

# The resume id is a number the stage gives each request row when it writes the requests, not
# response_id: response_id comes from the input's query_id (or the query's text), and a user's
# file may hold one twice; Ray Data's checkpoint would then take a row as written because its
# twin was, and drop it on resume.
REQUEST_NO = "request_no"  # (not "request_id": Ray Data LLM writes its own column of that name)


def normalize(batch: pd.DataFrame, max_query_chars: int) -> pd.DataFrame:
    """Give every input row a query_id and a reason if it must not reach the engine."""
    queries = batch["query"].map(lambda q: q if isinstance(q, str) else ("" if q is None else str(q)))
    if "query_id" in batch.columns:
        ids = [str(i) if i is not None and str(i) else stable_query_id(q) for i, q in zip(batch["query_id"], queries)]
    else:
        ids = [stable_query_id(q) for q in queries]
    reasons = [
        "empty_query" if not q.strip() else "query_too_long" if len(q) > max_query_chars else None
        for q in queries
    ]
    return pd.DataFrame({"query_id": ids, "query": queries, REASON: reasons})



def _excluded_inputs(batch: pd.DataFrame, solver: str) -> pa.Table:
    rows = [{"query_id": r["query_id"], "response_id": r["response_id"], "query": r["query"], "solver_model": solver,
             REASON: r[REASON], TOKENS: 0, REQUEST_NO: r[REQUEST_NO]} for r in batch.to_dict("records")]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _expand(batch: pd.DataFrame, n: int, run_seed: int) -> pd.DataFrame:
    """One request row per (question, sample_idx), each with its own seed; a rejected question
    stays one row with its reason (it never reaches the engine)."""
    out = {"query_id": [], "response_id": [], "query": [], "sample_idx": [], "seed": [], REASON: []}
    for qid, q, reason in zip(batch["query_id"], batch["query"], batch[REASON]):
        for k in ([None] if isinstance(reason, str) else range(n)):
            out["query_id"].append(qid)
            out["response_id"].append(f"{qid}#{'-' if k is None else k}")
            out["query"].append(q)
            out["sample_idx"].append(k)
            out["seed"].append(None if k is None else derive_seed(run_seed, "responses", qid, k))
            out[REASON].append(reason if isinstance(reason, str) else None)
    return pd.DataFrame(out).astype({"sample_idx": "Int64", "seed": "Int64"})


class _Prompt:
    def __init__(self, prefix: str, suffix: str, instruction: str, sampling: dict):
        self.prefix, self.suffix, self.instruction, self.sampling = prefix, suffix, instruction, sampling

    def __call__(self, row: dict) -> dict:
        user = solver_user_text(row["query"], self.instruction)
        return {"prompt": self.prefix + user + self.suffix,
                "sampling_params": {**self.sampling, "seed": int(row["seed"])}}


def finalize(batch: pd.DataFrame, solver: str, sampling: dict, stop_ids: list, max_model_len: int) -> pa.Table:
    rows = []
    sampling_json = json.dumps(sampling, sort_keys=True)
    for r in batch.to_dict("records"):
        out = engine_result(r, sampling["max_tokens"], max_model_len, stop_ids)
        answer, how = extract_answer(out["text"])
        rows.append({
            "query_id": r["query_id"], "response_id": r["response_id"], "sample_idx": int(r["sample_idx"]),
            "query": r["query"],
            "response": None if out["error"] else out["text"].strip(), "answer": answer, "answer_format": how,
            "solver_model": solver, "seed": int(r["seed"]), "sampling": sampling_json,
            "finish_reason": out["finish_reason"], "num_input_tokens": out["num_input_tokens"],
            TOKENS: out["num_output_tokens"], REASON: "engine_error" if out["error"] else None, "error": out["error"],
            REQUEST_NO: None if r.get(REQUEST_NO) is None else int(r[REQUEST_NO]),  # (difficulty_labels has none)
        })
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _numbered_requests(path: str, filesystem, min_rows: int):
    """A Parquet datasink that numbers the request rows it writes (REQUEST_NO): the write task's
    index in the high 32 bits, the row's place among that task's rows below. The requests are
    written once per attempt of the stage and read again on resume, so the numbers are unique
    and stable; a retried write task writes the same rows under the same file names again."""
    import numpy as np
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
    from ray.data.block import BlockAccessor

    class NumberedRequests(ParquetDatasink):
        def write(self, blocks, ctx) -> None:
            tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
            if not tables:
                return
            table = pa.concat_tables(tables, promote_options="permissive")
            ids = np.arange(table.num_rows, dtype=np.int64) + (int(ctx.task_idx) << 32)
            super().write([table.append_column(REQUEST_NO, pa.array(ids))], ctx)

    return NumberedRequests(path, filesystem=filesystem, min_rows_per_file=min_rows)


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    import ray
    from ray.data.expressions import col

    rcfg = cfg.stages.responses
    model = cfg.models[rcfg.model]
    turn, stops, sampling = chat_sampling(model, rcfg.sampling, cfg.storage.endpoint_url)
    # The questions are expanded into one row per candidate first and written under _work/, each
    # numbered: the generation then maps rows 1:1, which is what Ray Data's checkpointing (resume
    # id REQUEST_NO) needs; a question's n candidates may land in different blocks.
    work, done = storage.path("responses", WORK, "requests"), storage.path("responses", WORK, "_done.json")
    if not storage.exists(done) or REQUEST_NO not in storage.read_json(done):
        source = read_input(given.uri, cfg.storage.endpoint_url, required_column="query")
        if source.count() == 0:
            raise InputError(f"input {given.uri} has no rows")
        storage.delete_dir(work)
        source.map_batches(normalize, batch_format="pandas", fn_kwargs={"max_query_chars": rcfg.max_query_chars}) \
            .map_batches(_expand, batch_format="pandas", fn_kwargs={"n": rcfg.n, "run_seed": cfg.seed}) \
            .write_datasink(_numbered_requests(work, storage.fs, cfg.storage.rows_for("responses")))
        storage.write_json(done, {"n": rcfg.n, REQUEST_NO: True})
    requests = ray.data.read_parquet(work, filesystem=storage.fs)
    rejected = requests.filter(expr=col(REASON).is_not_null()).map_batches(
        _excluded_inputs, batch_format="pandas", fn_kwargs={"solver": model.path})
    processor = build_llm(model, _Prompt(turn.prefix, turn.suffix, rcfg.instruction, sampling), keep_all, cfg.storage.endpoint_url)
    generated = processor(requests.filter(expr=col(REASON).is_null()).drop_columns([REASON])).map_batches(
        finalize, batch_format="pandas",
        fn_kwargs=dict(solver=model.path, sampling=sampling, stop_ids=stops, max_model_len=model.engine.max_model_len),
    )
    return generated.union(rejected)


STAGE = Stage("responses", build, runs_on="engine", resume_id=REQUEST_NO, resume_id_made_here=True,
              private_columns=(REQUEST_NO,), unit="candidates")
