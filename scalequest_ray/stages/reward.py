"""Reward scoring (ScaleQuest stage 6): a reward model scores every candidate response, on the
bare question and the response (no solver instruction), as in the paper. Sequence-classification
reward models (Skywork-Reward style) are served by vLLM's classify task on replica pools, or by
the batched HF actor pool (`engine: hf`); a trust_remote_code model's own `get_scores`
(InternLM2-Reward style) always by the HF pool (scoring.score). (min, max) replicas from the
model's `scale`."""

from __future__ import annotations

import pyarrow as pa

from ..columns import REASON, set_columns, with_ids
from ..config import RunConfig
from ..scoring import score
from ..stage import Stage, StageInput
from ..storage import Storage, read_input


def _mark(table: pa.Table, model_path: str) -> pa.Table:
    reasons = ["no_response" if not (isinstance(r, str) and r.strip()) else "scoring_error" if e else None
               for r, e in zip(table["response"].to_pylist(), table["score_error"].to_pylist())]
    return set_columns(table, {REASON: pa.array(reasons, pa.string()),
                               "reward_model": pa.array([model_path] * table.num_rows, pa.string())})


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    rcfg = cfg.stages.reward
    model = cfg.models[rcfg.model]
    source = read_input(given.uri, cfg.storage.endpoint_url, required_column=["query", "response"])
    scored = score(source.map_batches(with_ids, batch_format="pyarrow"), model, out="reward", pairs=True,
                   method=rcfg.method, max_length=rcfg.max_length, engine=rcfg.engine, endpoint=cfg.storage.endpoint_url)
    return scored.map_batches(_mark, batch_format="pyarrow", fn_kwargs={"model_path": model.path})


STAGE = Stage("reward", build, runs_on="scoring", resume_id="response_id", tokens_column=None, unit="candidates")
