"""Difficulty labels (ScaleQuest stage 3, difficulty part a): the solver samples k solutions for
problems with known answers; a problem's label is its FAIL RATE, the share of the k final
answers that are not equal to the reference (math-verify equivalence, filters.answers_equal).
The difficulty scorer is trained on these labels (stage difficulty_scorer)."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa

from ..config import RunConfig
from ..engine import build_llm, chat_sampling, keep_all
from ..filters import answers_equal, gold_answer
from ..columns import REASON, TOKENS
from .. import shuffle
from ..stage import Stage, StageInput
from ..storage import Storage
from . import responses

SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("query", pa.string()),
    ("reference_answer", pa.string()),
    ("source", pa.string()),
    ("k", pa.int64()),
    ("correct", pa.int64()),
    ("fail_rate", pa.float64()),
    ("answers", pa.list_(pa.string())),
    (TOKENS, pa.int64()),
    (REASON, pa.string()),
])


def _prepare(batch: pd.DataFrame, qcol: str, acol: str, fmt: str, source: str, max_chars: int) -> pd.DataFrame:
    from .seed_problems import normalize_question

    queries = [normalize_question(q) for q in batch[qcol]]
    golds = [gold_answer(a, fmt) for a in batch[acol]]
    reasons = ["empty_query" if not q else "query_too_long" if len(q) > max_chars else
               "no_reference_answer" if g is None else None for q, g in zip(queries, golds)]
    return pd.DataFrame({"query_id": ["label-" + hashlib.sha1(q.encode()).hexdigest()[:16] for q in queries],
                         "query": queries, "reference_answer": golds, "source": source, REASON: reasons})


def _excluded(batch: pd.DataFrame) -> pa.Table:
    bad = batch[batch[REASON].notna()]
    return pa.Table.from_pylist([{**r, "k": 0, "correct": 0, TOKENS: 0} for r in bad.to_dict("records")], schema=SCHEMA)


def _with_gold(batch: pd.DataFrame, n: int, run_seed: int) -> pd.DataFrame:
    good = batch[batch[REASON].isna()]
    expanded = responses._expand(batch, n, run_seed)
    gold = dict(zip(good["query_id"], good["reference_answer"]))
    source = dict(zip(good["query_id"], good["source"]))
    expanded["reference_answer"] = expanded["query_id"].map(gold)
    expanded["source"] = expanded["query_id"].map(source)
    return expanded


def _grade(batch: pd.DataFrame, sampling: dict, stop_ids: list, max_model_len: int) -> pd.DataFrame:
    table = responses.finalize(batch, "", sampling, stop_ids, max_model_len).to_pandas()
    table["reference_answer"] = list(batch["reference_answer"])
    table["source"] = list(batch["source"])
    table["correct"] = [int(answers_equal(a, g)) if r is None else 0
                        for a, g, r in zip(table["answer"], table["reference_answer"], table[REASON])]
    return table[["query_id", "query", "reference_answer", "source", "answer", "correct", TOKENS]]


def _label(group: pd.DataFrame) -> pa.Table:
    k = len(group)
    correct = int(group["correct"].sum())
    first = group.iloc[0]
    return pa.Table.from_pylist([{
        "query_id": first["query_id"], "query": first["query"], "reference_answer": first["reference_answer"],
        "source": first["source"], "k": k, "correct": correct, "fail_rate": 1 - correct / k,
        "answers": [a if isinstance(a, str) else None for a in group["answer"]],
        TOKENS: int(group[TOKENS].sum()), REASON: None,
    }], schema=SCHEMA)


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    from .seed_problems import _source_dataset

    lcfg = cfg.stages.difficulty_labels
    model = cfg.models[lcfg.model]
    parts = []
    for src in lcfg.sources:
        ds, name, column = _source_dataset(src, cfg.storage.endpoint_url)
        parts.append(ds.map_batches(_prepare, batch_format="pandas", fn_kwargs=dict(
            qcol=column, acol=src.answer_column, fmt=src.answer_format, source=name, max_chars=lcfg.max_query_chars)))
    problems = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if lcfg.max_problems:
        problems = problems.limit(lcfg.max_problems)
    turn, stops, sampling = chat_sampling(model, lcfg.sampling, cfg.storage.endpoint_url)
    requests = problems.map_batches(_with_gold, batch_format="pandas", fn_kwargs={"n": lcfg.k, "run_seed": cfg.seed})
    processor = build_llm(model, responses._Prompt(turn.prefix, turn.suffix, lcfg.instruction, sampling), keep_all,
                          cfg.storage.endpoint_url)
    graded = processor(requests).map_batches(
        _grade, batch_format="pandas",
        fn_kwargs=dict(sampling=sampling, stop_ids=stops, max_model_len=model.engine.max_model_len))
    labels = shuffle.groupby(graded, "query_id", shuffle.partitions()).map_groups(_label, batch_format="pandas")
    return labels.union(problems.map_batches(_excluded, batch_format="pandas"))


STAGE = Stage("difficulty_labels", build, runs_on="engine", unit="labelled problems")
