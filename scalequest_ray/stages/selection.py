"""Selection (ScaleQuest stage 6, and what the reference lacks: answer agreement): per question,
the candidates' final answers are clustered by equivalence (math-verify), the majority answer and
its share recorded, and the best candidate by reward chosen, optionally only among those that
agree with the majority and above a minimum reward. Output: one row per question (the final
dataset) as Parquet, plus a JSONL export that `datasets` loads."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from ..columns import REASON
from ..config import RunConfig
from ..filters import majority
from .. import shuffle
from ..stage import Stage, StageInput
from ..storage import Storage, read_input

SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("query", pa.string()),
    ("response", pa.string()),
    ("answer", pa.string()),
    ("reward", pa.float64()),
    ("majority_answer", pa.string()),
    ("agreement", pa.float64()),
    ("agrees_with_majority", pa.bool_()),
    ("num_candidates", pa.int64()),
    ("sample_idx", pa.int64()),
    ("solver_model", pa.string()),
    ("reward_model", pa.string()),
    ("seed", pa.int64()),
    ("sampling", pa.string()),
    (REASON, pa.string()),
])


def select(group: pd.DataFrame, require_majority: bool, min_reward, min_agreement: float) -> pa.Table:
    """One question's candidates -> one row: the chosen candidate, or a reason none qualified."""
    group = group.sort_values("sample_idx", kind="stable") if "sample_idx" in group else group
    answers = [a if isinstance(a, str) and a else None for a in group["answer"]]
    major, share, agrees = majority(answers)
    rewards = [float(r) for r in group["reward"]]
    candidates = [i for i in range(len(group)) if not require_majority or agrees[i]]
    reason = None
    if require_majority and major is None:
        reason = "no_answer"
    elif share < min_agreement:
        reason = "low_agreement"
    elif min_reward is not None:
        candidates = [i for i in candidates if rewards[i] >= min_reward]
        if not candidates:
            reason = "below_min_reward"
    best = max(candidates, key=lambda i: (rewards[i], -i)) if candidates and reason is None else \
        max(range(len(group)), key=lambda i: (rewards[i], -i))
    row = group.iloc[best]

    def get(col, cast=str):
        # pd.isna: a missing value may arrive as None, NaN or pandas' NA (string columns), and
        # str(pd.NA) is the string "<NA>".
        v = row.get(col) if col in group else None
        return None if v is None or pd.isna(v) else cast(v)

    return pa.Table.from_pylist([{
        "query_id": get("query_id"), "query": get("query"), "response": get("response"), "answer": get("answer"),
        "reward": rewards[best], "majority_answer": major, "agreement": share, "agrees_with_majority": agrees[best],
        "num_candidates": len(group), "sample_idx": get("sample_idx", int), "solver_model": get("solver_model"),
        "reward_model": get("reward_model"), "seed": get("seed", int), "sampling": get("sampling"), REASON: reason,
    }], schema=SCHEMA)


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    scfg = cfg.stages.selection
    source = read_input(given.uri, cfg.storage.endpoint_url, required_column=["query_id", "query", "response", "reward"])
    if "answer" not in source.schema().names:
        source = source.add_column("answer", lambda df: pd.Series([None] * len(df), dtype=object))
    return shuffle.groupby(source, "query_id", shuffle.partitions()).map_groups(
        select, batch_format="pandas",
        fn_kwargs=dict(require_majority=scfg.require_majority, min_reward=scfg.min_reward,
                       min_agreement=scfg.min_agreement))


# The final dataset is also written as JSON Lines (one file per write task, in the same pass).
STAGE = Stage("selection", build, tokens_column=None, jsonl=lambda cfg: cfg.stages.selection.jsonl)
