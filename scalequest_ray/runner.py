"""Runs one data stage: skip if finished, otherwise build its dataset and write it ONCE, kept rows
to data/ and excluded rows to exclusions/ in the same pass, then commit a manifest.

One pass: the stage's dataset goes through one Ray Data write (`SplitSink`): each write task
splits its rows by `exclude_reason`, writes one data/ file and one exclusions/ file, and records
in each file's Parquet footer its rows by reason, its generated tokens and the stage's own
counters. The commit sums those footers; nothing is read back or recomputed.

Exactly-once under failures, layer by layer:
- a task or a replica actor dies (killed process, lost node): Ray Data retries the task and
  restarts the actor (its actor pools use max_restarts=-1, max_task_retries=-1) and the block is
  recomputed; a retried write task writes the same file names again (they derive from the write
  id and the task index), so nothing is written twice;
- the driver dies mid-stage: stages that declare a resume id write with Ray Data's checkpointing
  (`DataContext.checkpoint_config`, id column, two-phase commit per write task: pending ids
  first, then the files, then the commit). Running the same command again keeps the committed
  files, deletes the files of writes whose commit never happened (Ray Data matches them to
  their pending checkpoints by file-name prefix), and filters the already-written ids out at
  the read, so those rows are not generated again. Stages without a resume id (grouping stages:
  dedup, difficulty, selection) start over; they are the cheap CPU ones;
- storage errors: pyarrow's S3 client retries requests, each file write is retried on the
  errors Ray Data retries, and the manifest (the only commit a later stage trusts) is written
  after the row counts of data/ + exclusions/ were checked against what the writes returned.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from .columns import REASON
from .config import RunConfig
from .stage import Stage, StageInput
from .storage import STATS_KEY, Storage

WORK = "_work"                # scratch a stage's build may write (e.g. the expanded requests)
CHECKPOINTS = "_checkpoints"  # <root>/_checkpoints/<stage>: Ray Data's checkpoint of a stage's write
STARTED = "_started.json"     # the config hash this attempt runs under



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


def file_stats(table: pa.Table, excluded: bool, tokens_column: Optional[str], counters) -> dict:
    """What one written file holds, for its footer: rows by exclusion reason, generated tokens,
    and the stage's own additive counters."""
    stats: dict = {}
    if excluded:
        grouped = table.group_by(REASON).aggregate([(REASON, "count")])
        stats["excluded_by_reason"] = dict(zip(grouped[REASON].to_pylist(), grouped[f"{REASON}_count"].to_pylist()))
    if tokens_column and tokens_column in table.column_names:
        stats["output_tokens"] = int(pc.sum(table[tokens_column].cast(pa.int64())).as_py() or 0)
    if counters:
        stats["counters"] = counters(table)
    return stats


def _jsonl(table: pa.Table) -> bytes:
    # Rows from Arrow's own Python values: nulls stay null and integers stay integers (a pandas
    # round trip would turn a null in an int column into NaN and the others into floats).
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in table.to_pylist()).encode()


def _split_sink_class():
    """SplitSink is built on Ray Data's Parquet datasink (imported here: this module is imported
    by the CLI's Ray-free commands)."""
    from ray._common.retry import call_with_retry
    from ray.data._internal.datasource.parquet_datasink import (WRITE_FILE_MAX_ATTEMPTS,
                                                                WRITE_FILE_RETRY_MAX_BACKOFF_SECONDS,
                                                                ParquetDatasink)
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
    from ray.data.block import BlockAccessor
    from ray.data.datasource.filename_provider import _split_base_and_ext

    class SplitSink(ParquetDatasink):
        """A Parquet datasink with two outputs under the stage's folder: data/ (kept rows, without
        the reason column) and exclusions/ (with it), plus jsonl/ of the kept rows on request.

        Subclassing Ray's ParquetDatasink keeps what its writes are trusted for: rows bundled to
        `min_rows_per_file` per task, and checkpointing's two-phase commit, whose recovery finds
        a failed task's files under the sink's folder by the task's file-name prefix, the same
        `<write id>_<task>` our data/ and exclusions/ files are named with."""

        def __init__(self, path: str, filesystem, min_rows: int, private: tuple, tokens_column: Optional[str],
                     counters, jsonl: bool):
            import pyarrow.fs as pafs

            super().__init__(path, filesystem=filesystem, min_rows_per_file=min_rows)
            # (Ray wraps the filesystem it is given; whether folders must be made is decided here.)
            self.local = isinstance(filesystem, pafs.LocalFileSystem)
            self.private, self.tokens_column, self.counters, self.jsonl = private, tokens_column, counters, jsonl
            self.rows_written = 0

        def _put(self, sub: str, base: str, write) -> None:
            folder = posixpath.join(self.path, sub)
            if self.local:
                self.filesystem.create_dir(folder, recursive=True)
            call_with_retry(lambda: write(posixpath.join(folder, base)), description=f"write {sub}/{base}",
                            match=self._data_context.retried_io_errors, max_attempts=WRITE_FILE_MAX_ATTEMPTS,
                            max_backoff_s=WRITE_FILE_RETRY_MAX_BACKOFF_SECONDS)

        def write(self, blocks, ctx) -> int:
            import pyarrow.parquet as pq

            tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
            if not tables:
                return 0
            table = pa.concat_tables(tables, promote_options="permissive")
            table = table.drop_columns([c for c in self.private if c in table.column_names])
            base, _ = _split_base_and_ext(self.filename_provider.get_filename_for_task(
                ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx))
            excluded = pc.is_valid(table[REASON])
            kept = table.filter(pc.invert(excluded)).drop_columns([REASON])
            for sub, part, is_excluded in (("data", kept, False), ("exclusions", table.filter(excluded), True)):
                if part.num_rows == 0:
                    continue
                stats = file_stats(part, is_excluded, self.tokens_column, self.counters)
                part = part.replace_schema_metadata({**(part.schema.metadata or {}), STATS_KEY: json.dumps(stats).encode()})
                self._put(sub, base + ".parquet", lambda p, t=part: pq.write_table(t, p, filesystem=self.filesystem))
            if self.jsonl and kept.num_rows:
                data = _jsonl(kept)

                def write_jsonl(p):
                    with self.filesystem.open_output_stream(p) as f:
                        f.write(data)

                self._put("jsonl", base + ".jsonl", write_jsonl)
            return table.num_rows

        def on_write_complete(self, write_result) -> None:
            # (the returns travel in a block, as numpy integers)
            self.rows_written = int(sum(int(r or 0) for r in write_result.write_returns))

    return SplitSink


def checkpoint_config(storage: Storage, stage: str, id_column: str):
    """Ray Data checkpointing for the write of `stage`, keyed by `id_column`. It lives outside the
    stage's folder: checkpoint recovery deletes every file under the written folder whose name
    starts like a pending checkpoint's, and that would include the pending checkpoints themselves."""
    from ray.data.checkpoint import CheckpointConfig

    # The runner deletes the checkpoint after the manifest is written: a driver that dies between
    # the last write and the manifest then resumes with every id already committed.
    config = CheckpointConfig(id_column=id_column, checkpoint_path=storage.path(CHECKPOINTS, stage),
                              override_filesystem=storage.fs, delete_checkpoint_on_success=False)
    # On a resumed run every read gets a filter actor pool of 1 CPU each (up to 10 by default):
    # one actor filters millions of ids a second, and more would take CPUs from the engines
    # (with 2 reads on a 2-CPU cluster the default deadlocks).
    config.checkpoint_actor_pool_min_size = config.checkpoint_actor_pool_max_size = 1
    return config


def reads(dataset) -> int:
    """Reads in the dataset's plan: on a resumed run Ray Data puts a checkpoint filter actor pool
    behind each. A read that two branches share counts twice: the planner plans it once per
    branch (responses reads its requests for the generated and the rejected rows). Ray Data has
    no public view of a plan's operators."""
    from ray.data._internal.logical.operators.read_operator import Read, ReadFiles

    todo, count = [dataset._logical_plan.dag], 0
    while todo:
        op = todo.pop()
        count += isinstance(op, (Read, ReadFiles))
        todo.extend(op.input_dependencies)
    return count


def committed_rows(storage: Storage, stage: str) -> int:
    """Rows whose write an earlier attempt committed (pending ones excluded)."""
    files = [f for f in storage.parquet_files(storage.path(CHECKPOINTS, stage)) if not f.endswith(".pending.parquet")]
    return storage.count_rows(files)


def _drop_checkpoint(storage: Storage, stage: str) -> None:
    storage.delete_dir(storage.path(CHECKPOINTS, stage))
    # On S3 the checkpoint writer leaves a folder marker for _checkpoints/ itself.
    if not storage.files(storage.path(CHECKPOINTS)):
        storage.delete_dir(storage.path(CHECKPOINTS))


def _clear(storage: Storage, stage: str) -> None:
    storage.delete_dir(storage.path(stage))
    _drop_checkpoint(storage, stage)


def expected_rows(cfg: RunConfig, stage: str, given: StageInput) -> Optional[int]:
    """How many rows the stage will write (kept + excluded), when it can be known up front."""
    from .config import stage_kind

    kind, section = stage_kind(stage), cfg.section(stage)
    if kind == "questions":
        return sum(g.num_questions for g in section.generators)
    if kind == "qpo_pairs":
        return section.num_questions
    if given.rows_in is None:
        return None
    return given.rows_in * section.n if kind == "responses" else given.rows_in


def _written_so_far(storage: Storage, stage: str):
    """(rows, generated tokens) in the stage's written files, from their footers; each file's
    footer is read once."""
    seen: dict[str, tuple[int, int]] = {}

    def done() -> tuple[int, int]:
        new = [f for sub in ("data", "exclusions") for f in storage.parquet_files(storage.path(stage, sub))
               if f not in seen]
        for f, (rows, stats) in zip(new, storage.footers(new)):
            seen[f] = (rows, int(stats.get("output_tokens", 0)))
        return sum(r for r, _ in seen.values()), sum(t for _, t in seen.values())

    return done


def run_stage(cfg: RunConfig, storage: Storage, spec: Stage, given: StageInput, force: bool = False,
              echo=print, fit=None) -> StageResult:
    """Run `spec` on `given` (its input, upstream identity and rows in, worked out once by the
    pipeline). `spec.build` returns a Ray Dataset with a REASON column (null = kept).

    With a resume id (the stage's own; over a user's file, where ids may repeat, only one the
    stage numbers itself), an interrupted attempt is continued (see the module docstring).

    `fit(cfg, stage, filters)` -> (config, lines): the config the stage's pools run with on this
    cluster (capacity.fit_to_cluster), given the checkpoint filter actors a resume adds."""
    stage = spec.name
    fingerprint = cfg.stage_fingerprint(stage, given.upstream)
    previous = storage.manifest(stage)
    if previous and previous.get("config_hash") == fingerprint and not force:
        return StageResult(stage, previous, skipped=True)

    resume_id = None if given.from_user_file and not spec.resume_id_made_here else spec.resume_id
    started_path = storage.path(stage, STARTED)
    before = storage.read_json(started_path) if storage.exists(started_path) else None
    resuming = bool(resume_id) and not force and previous is None and bool(before) \
        and before.get("config_hash") == fingerprint
    if not resuming:
        # Another config, or a stage that cannot resume: whatever is there is stale or half-written.
        _clear(storage, stage)
        storage.write_json(started_path, {"config_hash": fingerprint, "started_at": time.time()})
    started = time.time()
    resumed_rows = committed_rows(storage, stage) if resuming else 0

    def build(run_cfg: RunConfig):
        ds = spec.build(run_cfg, storage, given)
        if resume_id:
            ds.context.checkpoint_config = checkpoint_config(storage, stage, resume_id)
        return ds

    dataset = build(cfg)
    fitted, lines = fit(cfg, stage, reads(dataset) if resumed_rows else 0) if fit else (cfg, [])
    if lines:
        for line in lines:
            echo(line)
        dataset = build(fitted)
    sink = _split_sink_class()(storage.path(stage), storage.fs, cfg.storage.rows_for(stage), tuple(spec.private_columns),
                               spec.tokens_column, spec.counters, bool(spec.jsonl and spec.jsonl(cfg)))
    from .console import StageProgress, interactive

    if interactive():  # Ray Data's own progress bars show the rows
        dataset.write_datasink(sink)
    else:
        with StageProgress(stage, _written_so_far(storage, stage), expected_rows(cfg, stage, given), echo):
            dataset.write_datasink(sink)

    extra = spec.finish(cfg, storage) if spec.finish else {}
    from .ledger import stage_ledger

    extra["resources"] = stage_ledger(started)
    if sink.jsonl:
        extra["jsonl_files"] = sorted(storage._rel(f) for f in storage.files(storage.path(stage, "jsonl")))
    manifest = storage.commit_stage(
        stage,
        fingerprint,
        started,
        {
            "uri": storage.uri(stage),
            "upstream": given.upstream,
            "rows_in": given.rows_in,
            "resumed_rows": resumed_rows,
            "rows_written": sink.rows_written,
            "config": getattr(cfg.stages, stage).model_dump(mode="json"),
            **extra,
        },
        expect_rows=resumed_rows + sink.rows_written,
    )
    storage.delete_dir(storage.path(stage, WORK))
    _drop_checkpoint(storage, stage)
    if storage.exists(started_path):
        storage.fs.delete_file(started_path)
    return StageResult(stage, manifest, skipped=False)
