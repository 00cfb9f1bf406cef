"""Runs one stage: skip if finished, otherwise build its dataset, write shards, commit a manifest."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from .config import RunConfig
from .storage import Storage

# Every stage's annotated dataset carries these two columns; the runner splits on the first and
# sums the second for the summary line.
REASON = "exclude_reason"
TOKENS = "num_output_tokens"


@dataclass
class StageResult:
    stage: str
    manifest: dict
    skipped: bool

    def summary(self) -> str:
        m = self.manifest
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(m.get("excluded_by_reason", {}).items()))
        head = f"[{self.stage}] {'skipped (finished earlier, same config)' if self.skipped else 'done'}:"
        line = f"{head} {m['rows']} rows kept, {m['excluded_rows']} excluded"
        if reasons:
            line += f" ({reasons})"
        tokens = m.get("output_tokens", 0)
        if not self.skipped and tokens:
            line += f", {tokens} tokens generated in {m['seconds']:.1f} s ({tokens / max(m['seconds'], 1e-9):.1f} tok/s)"
        elif not self.skipped:
            line += f" in {m['seconds']:.1f} s"
        return line + f" -> {m['uri']}"


def _rows(table: pa.Table, excluded: bool) -> pa.Table:
    mask = pc.is_valid(table[REASON]) if excluded else pc.is_null(table[REASON])
    out = table.filter(mask)
    return out if excluded else out.drop_columns([REASON])


def _block_stats(table: pa.Table, tokens_column: Optional[str]) -> pa.Table:
    """Per-block (reason, rows, tokens): a few rows per block, summed on the driver."""
    tokens = table[tokens_column].cast(pa.int64()) if tokens_column else pa.array([0] * table.num_rows, pa.int64())
    grouped = pa.table({
        "reason": pc.fill_null(table[REASON], "kept"),
        "tokens": pc.fill_null(tokens, 0),
    }).group_by("reason").aggregate([("tokens", "count"), ("tokens", "sum")])
    return pa.table({"reason": grouped["reason"], "rows": grouped["tokens_count"], "tokens": grouped["tokens_sum"]})


def run_stage(
    cfg: RunConfig,
    storage: Storage,
    stage: str,
    build: Callable[[], "object"],
    upstream: Optional[str] = None,
    force: bool = False,
    tokens_column: Optional[str] = TOKENS,
    finish: Optional[Callable[[], dict]] = None,
    rows_in: Optional[int] = None,
) -> StageResult:
    """`build()` returns a Ray Dataset with a REASON column (null = kept). `tokens_column`: the
    column with the tokens THIS stage generated (None for stages that generate nothing).
    `finish()` runs after data/ is written and before the manifest; its dict joins the manifest."""
    import ray

    fingerprint = cfg.stage_fingerprint(stage, upstream)
    previous = storage.manifest(stage)
    if previous and previous.get("config_hash") == fingerprint and not force:
        return StageResult(stage, previous, skipped=True)

    # No manifest (or another config): whatever is there is stale or half-written.
    storage.delete_dir(storage.path(stage))
    started = time.time()
    dataset = build()
    staging = storage.path(stage, "_staging")
    # Generation runs exactly once, into staging; the split below re-reads the shards, it does
    # not re-run the engines.
    dataset.write_parquet(staging, filesystem=storage.fs, min_rows_per_file=cfg.storage.rows_per_file)

    staged = ray.data.read_parquet(staging, filesystem=storage.fs)
    for sub, excluded in (("data", False), ("exclusions", True)):
        staged.map_batches(_rows, fn_kwargs={"excluded": excluded}, batch_format="pyarrow").write_parquet(
            storage.path(stage, sub), filesystem=storage.fs, min_rows_per_file=cfg.storage.rows_per_file
        )
    by_reason: dict[str, int] = {}
    tokens = 0
    # One small row per (block, reason): driver memory grows with the number of blocks, not rows.
    for row in staged.map_batches(_block_stats, fn_kwargs={"tokens_column": tokens_column},
                                  batch_format="pyarrow").iter_rows():
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + int(row["rows"])
        tokens += int(row["tokens"] or 0)
    storage.delete_dir(staging)
    extra = finish() if finish else {}
    manifest = storage.commit_stage(
        stage,
        fingerprint,
        started,
        {
            "uri": storage.uri(stage),
            "upstream": upstream,
            "excluded_by_reason": {k: v for k, v in by_reason.items() if k != "kept"},
            "output_tokens": tokens,
            "rows_in": rows_in,
            "config": getattr(cfg.stages, stage).model_dump(mode="json"),
            **extra,
        },
    )
    return StageResult(stage, manifest, skipped=False)
