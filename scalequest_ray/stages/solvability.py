"""Solvability filter (ScaleQuest stage 3): the solver model, greedy, judges whether each question
is a math problem that can be solved from its own conditions. The verdict is read strictly from
the reply's last line (`Verdict: Yes|No`, filters.parse_verdict), not from "yes" anywhere in the
text. By default vLLM's structured outputs constrain the reply to one bounded line of reasoning
and that verdict line (filters.verdict_regex), so every reply has one; with `constrained: false`
(the reference's free reply) replies without one are `verdict_unparseable` (dropped by default,
`on_unparseable: keep`)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from ..columns import REASON, set_columns, with_ids
from ..config import RunConfig
from ..engine import build_llm, chat_sampling, engine_result, keep_all
from ..filters import parse_verdict, verdict_regex
from ..stage import Stage, StageInput
from ..storage import Storage, read_input

TOKENS_COLUMN = "judge_output_tokens"
NEW_FIELDS = [("solvable", pa.bool_()), ("judgement", pa.string()), (TOKENS_COLUMN, pa.int64()),
              ("judge_model", pa.string()), (REASON, pa.string())]


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    names = {n for n, _ in NEW_FIELDS}
    base = [f for f in input_schema if f.name not in names]
    if "query_id" not in input_schema.names:
        base.append(pa.field("query_id", pa.string()))
    return pa.schema(base + [pa.field(n, t) for n, t in NEW_FIELDS])


def _prepare(table: pa.Table, max_query_chars: int) -> pa.Table:
    table = with_ids(table)
    reasons = ["empty_query" if not (q or "").strip() else "query_too_long" if len(q) > max_query_chars else None
               for q in table["query"].to_pylist()]
    return set_columns(table, {REASON: pa.array(reasons, pa.string())})


def judge_sampling(sampling: dict, constrained: bool, reasoning_max_chars: int) -> dict:
    """The judge's vLLM sampling params: constrained to filters.verdict_regex through vLLM's
    structured outputs (Ray Data LLM turns the dict into StructuredOutputsParams), or free."""
    if not constrained:
        return dict(sampling)
    return {**sampling, "structured_outputs": {"regex": verdict_regex(reasoning_max_chars)}}


class _Prompt:
    def __init__(self, turn, instruction: str, sampling: dict):
        self.turn, self.instruction, self.sampling = turn, instruction, sampling

    def __call__(self, row: dict) -> dict:
        return {"prompt": self.turn.wrap(self.instruction.replace("{query}", row["query"])),
                "sampling_params": dict(self.sampling)}


def _judged(batch: pd.DataFrame, schema: pa.Schema, judge: str, max_tokens: int, max_model_len: int,
            stop_ids: list, on_unparseable: str) -> pa.Table:
    rows = []
    for r in batch.to_dict("records"):
        out = engine_result(r, max_tokens, max_model_len, stop_ids)
        verdict = None if out["error"] else parse_verdict(out["text"])
        reason = ("engine_error" if out["error"] else "unsolvable" if verdict is False
                  else ("verdict_unparseable" if on_unparseable == "drop" else None) if verdict is None else None)
        rows.append({**{k: r.get(k) for k in schema.names}, "solvable": verdict,
                     "judgement": out["error"] or out["text"], TOKENS_COLUMN: out["num_output_tokens"],
                     "judge_model": judge, REASON: reason})
    return pa.Table.from_pylist(rows, schema=schema)


def _excluded(table: pa.Table, schema: pa.Schema, judge: str) -> pa.Table:
    import pyarrow.compute as pc

    bad = table.filter(pc.is_valid(table[REASON])).to_pylist()
    return pa.Table.from_pylist([{**r, TOKENS_COLUMN: 0, "judge_model": judge} for r in bad], schema=schema)


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    import pyarrow.compute as pc

    scfg = cfg.stages.solvability
    model = cfg.models[scfg.model]
    source = read_input(given.uri, cfg.storage.endpoint_url, required_column="query")
    schema = output_schema(source.schema().base_schema)
    turn, stops, sampling = chat_sampling(model, scfg.sampling, cfg.storage.endpoint_url)
    sampling = judge_sampling(sampling, scfg.constrained, scfg.reasoning_max_chars)
    prepared = source.map_batches(_prepare, batch_format="pyarrow", fn_kwargs={"max_query_chars": scfg.max_query_chars})
    requests = prepared.map_batches(lambda t: t.filter(pc.is_null(t[REASON])).drop_columns([REASON]), batch_format="pyarrow")
    rejected = prepared.map_batches(_excluded, batch_format="pyarrow", fn_kwargs={"schema": schema, "judge": model.path})
    processor = build_llm(model, _Prompt(turn, scfg.instruction, sampling), keep_all, cfg.storage.endpoint_url)
    judged = processor(requests).map_batches(
        _judged, batch_format="pandas",
        fn_kwargs=dict(schema=schema, judge=model.path, max_tokens=scfg.sampling.max_tokens,
                       max_model_len=model.engine.max_model_len, stop_ids=stops, on_unparseable=scfg.on_unparseable))
    return judged.union(rejected)


def verdict_counts(table: pa.Table) -> dict:
    """How the judge answered, over kept AND dropped rows (summed from each written file): with
    `on_unparseable: keep` the replies without a verdict are kept, and this is where their number
    shows. Rows excluded before judging (empty, too long) or failed in the engine were not judged."""
    values, replies = table["solvable"].to_pylist(), table["judgement"].to_pylist()
    # A data/ file's rows have no reason column (kept rows have none); exclusions/ files do.
    errors = table[REASON].to_pylist() if REASON in table.column_names else [None] * table.num_rows
    judged = [v for v, reply, e in zip(values, replies, errors) if reply is not None and e != "engine_error"]
    return {"verdicts": {"yes": judged.count(True), "no": judged.count(False), "unparseable": judged.count(None),
                         "not_judged": len(values) - len(judged)}}


STAGE = Stage("solvability", build, runs_on="engine", resume_id="query_id", tokens_column=TOKENS_COLUMN,
              counters=verdict_counts)
