"""Reward scoring (ScaleQuest stage 6): a reward model scores every candidate response, on the
bare question and the response (no solver instruction), as in the paper. Batched actor pool
(scoring.Scorer): batch > 1 per forward, bf16 on GPU, (min, max) replicas from the model's
`scale`. Sequence-classification reward models (Skywork-Reward style) or a trust_remote_code
model's own `get_scores` (InternLM2-Reward style)."""

from __future__ import annotations

import pyarrow as pa

from ..columns import REASON, set_columns, with_ids
from ..config import RunConfig
from ..scoring import Scorer, actor_options
from ..stage import Stage, StageInput
from ..storage import Storage, read_input


def _mark(table: pa.Table, model_path: str) -> pa.Table:
    reasons = [None if isinstance(r, str) and r.strip() else "no_response" for r in table["response"].to_pylist()]
    return set_columns(table, {REASON: pa.array(reasons, pa.string()),
                               "reward_model": pa.array([model_path] * table.num_rows, pa.string())})


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    rcfg = cfg.stages.reward
    model = cfg.models[rcfg.model]
    source = read_input(given.uri, cfg.storage.endpoint_url, required_column=["query", "response"])
    return source.map_batches(with_ids, batch_format="pyarrow").map_batches(
        Scorer, batch_format="pyarrow", **actor_options(model),
        fn_constructor_kwargs=dict(model_path=model.path, endpoint=cfg.storage.endpoint_url, out="reward", pairs=True,
                                   method=rcfg.method, max_length=rcfg.max_length, dtype=model.engine.dtype,
                                   trust_remote_code=model.engine.trust_remote_code,
                                   threads=max(1, int(model.scale.cpus_per_replica))),
    ).map_batches(_mark, batch_format="pyarrow", fn_kwargs={"model_path": model.path})


STAGE = Stage("reward", build, runs_on="scoring", resume_id="response_id", tokens_column=None, unit="candidates")
