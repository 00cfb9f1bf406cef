"""Language filter (ScaleQuest stage 3, first filter): keep one math question per row, in the
configured languages, identified by py3langid (its model ships in the wheel, nothing is
downloaded). Unlike the reference's ASCII-only rule, questions with pi, degree signs, x or curly
quotes stay (`ascii_only: true` reproduces the reference). Every drop carries a reason."""

from __future__ import annotations

import pyarrow as pa

from ..columns import REASON, set_columns, with_ids
from ..config import RunConfig
from ..filters import language_reason
from ..stage import Stage, StageInput
from ..storage import Storage, read_input


def _filter(table: pa.Table, opts: dict) -> pa.Table:
    table = with_ids(table)
    reasons = [language_reason(q, **opts) for q in table["query"].to_pylist()]
    return set_columns(table, {REASON: pa.array(reasons, pa.string())})


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    lcfg = cfg.stages.language
    opts = lcfg.model_dump(exclude={"input"})
    return read_input(given.uri, cfg.storage.endpoint_url, required_column="query").map_batches(
        _filter, batch_format="pyarrow", fn_kwargs={"opts": opts})


STAGE = Stage("language", build, resume_id="query_id", tokens_column=None)
