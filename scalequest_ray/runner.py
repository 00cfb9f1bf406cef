"""Runs one stage: skip if finished, otherwise build its dataset, write shards, commit a manifest.

Exactly-once under failures, layer by layer:
- a task or a replica actor dies (killed process, lost node): Ray Data retries the task and
  restarts the actor (its actor pools use max_restarts=-1, max_task_retries=-1) and the block is
  recomputed; nothing is written twice because a block is written only once it is complete;
- the driver dies mid-stage: stages that declare a resume id write their staging shards with
  Ray Data's checkpointing (`DataContext.checkpoint_config`, id column, two-phase commit per
  written file). Running the same command again keeps the committed shards, deletes files
  whose commit never happened, and filters the already-written ids out at the read, so those
  rows are not generated again. Stages without a resume id (grouping stages: dedup,
  difficulty, selection) start over; they are the cheap CPU ones;
- storage errors: pyarrow's S3 client retries requests, Ray retries failed write tasks, and
  the manifest (the only commit a later stage trusts) is written after the row counts of data/
  + exclusions/ were checked against what was staged.
"""

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

STAGING = "_staging"        # everything the stage produced, before the kept/excluded split
WORK = "_work"              # scratch a stage's build may write (e.g. the expanded requests)
CHECKPOINT = "_checkpoint"  # Ray Data's checkpoint of the staging write (ids of committed rows)
STARTED = "_started.json"   # the config hash this attempt runs under
STAGED = "_staged.json"     # the staging write finished (a resumed run goes straight to the split)


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
        if not self.skipped and m.get("resumed_rows"):
            line += f", {m['resumed_rows']} rows taken over from an interrupted attempt, {m['rows_written']} written now"
        elif not self.skipped and tokens:
            line += f", {tokens} tokens generated in {m['seconds']:.1f} s ({tokens / max(m['seconds'], 1e-9):.1f} tok/s)"
        elif not self.skipped:
            line += f" in {m['seconds']:.1f} s"
        return line + f" -> {m['uri']}"


def _rows(table: pa.Table, excluded: bool, private: tuple = ()) -> pa.Table:
    mask = pc.is_valid(table[REASON]) if excluded else pc.is_null(table[REASON])
    out = table.filter(mask).drop_columns([c for c in private if c in table.column_names])
    return out if excluded else out.drop_columns([REASON])


def checkpoint_config(storage: Storage, stage: str, id_column: str):
    """Ray Data checkpointing for the staging write of `stage`, keyed by `id_column`."""
    from ray.data.checkpoint import CheckpointConfig

    config = CheckpointConfig(id_column=id_column, checkpoint_path=storage.path(stage, CHECKPOINT),
                              override_filesystem=storage.fs, delete_checkpoint_on_success=True)
    # On a resumed run every read gets a filter actor pool of 1 CPU each (up to 10 by default):
    # one actor filters millions of ids a second, and more would take CPUs from the engines
    # (with 2 reads on a 2-CPU cluster the default deadlocks).
    config.checkpoint_actor_pool_min_size = config.checkpoint_actor_pool_max_size = 1
    return config


def committed_rows(storage: Storage, stage: str) -> int:
    """Rows whose staging shard was committed by an earlier attempt (pending ones excluded)."""
    files = [f for f in storage.parquet_files(storage.path(stage, CHECKPOINT)) if not f.endswith(".pending.parquet")]
    return storage.count_rows(files)


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
    resume_id: Optional[str] = None,
    private_columns: tuple = (),
) -> StageResult:
    """`build()` returns a Ray Dataset with a REASON column (null = kept). `tokens_column`: the
    column with the tokens THIS stage generated (None for stages that generate nothing).
    `finish()` runs after data/ is written and before the manifest; its dict joins the manifest.
    `resume_id`: a column that is unique per row from the stage's reads to its output; with it,
    an interrupted attempt is continued (see the module docstring). `private_columns` are
    dropped from data/ and exclusions/ (e.g. a resume id that is not part of the output)."""
    import ray

    fingerprint = cfg.stage_fingerprint(stage, upstream)
    previous = storage.manifest(stage)
    if previous and previous.get("config_hash") == fingerprint and not force:
        return StageResult(stage, previous, skipped=True)

    started_path = storage.path(stage, STARTED)
    before = storage.read_json(started_path) if storage.exists(started_path) else None
    resuming = bool(resume_id) and not force and previous is None and bool(before) \
        and before.get("config_hash") == fingerprint
    if resuming:
        for sub in ("data", "exclusions"):  # a split the driver did not finish
            storage.delete_dir(storage.path(stage, sub))
    else:
        # Another config, or a stage that cannot resume: whatever is there is stale or half-written.
        storage.delete_dir(storage.path(stage))
        storage.write_json(started_path, {"config_hash": fingerprint, "started_at": time.time()})
    started = time.time()
    staging = storage.path(stage, STAGING)
    if resuming and storage.exists(storage.path(stage, STAGED)):
        resumed_rows = storage.count_rows(storage.parquet_files(staging))
    else:
        resumed_rows = committed_rows(storage, stage) if resuming else 0
        dataset = build()
        if resume_id:
            dataset.context.checkpoint_config = checkpoint_config(storage, stage, resume_id)
        # Generation runs exactly once, into staging; the split below re-reads the shards, it
        # does not re-run the engines.
        dataset.write_parquet(staging, filesystem=storage.fs, min_rows_per_file=cfg.storage.rows_for(stage))
        storage.write_json(storage.path(stage, STAGED), {"at": time.time()})

    staged_rows = storage.count_rows(storage.parquet_files(staging))
    staged = ray.data.read_parquet(staging, filesystem=storage.fs)
    for sub, excluded in (("data", False), ("exclusions", True)):
        staged.map_batches(_rows, fn_kwargs={"excluded": excluded, "private": tuple(private_columns)},
                           batch_format="pyarrow").write_parquet(
            storage.path(stage, sub), filesystem=storage.fs, min_rows_per_file=cfg.storage.rows_for(stage)
        )
    by_reason: dict[str, int] = {}
    tokens = 0
    # One small row per (block, reason): driver memory grows with the number of blocks, not rows.
    for row in staged.map_batches(_block_stats, fn_kwargs={"tokens_column": tokens_column},
                                  batch_format="pyarrow").iter_rows():
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + int(row["rows"])
        tokens += int(row["tokens"] or 0)
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
            "resumed_rows": resumed_rows,
            "rows_written": staged_rows - resumed_rows,
            "config": getattr(cfg.stages, stage).model_dump(mode="json"),
            **extra,
        },
        expect_rows=staged_rows,
    )
    for scratch in (STAGING, WORK, CHECKPOINT):
        storage.delete_dir(storage.path(stage, scratch))
    for marker in (STARTED, STAGED):
        if storage.exists(storage.path(stage, marker)):
            storage.fs.delete_file(storage.path(stage, marker))
    return StageResult(stage, manifest, skipped=False)
