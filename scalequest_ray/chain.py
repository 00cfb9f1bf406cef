"""Which data a chain stage reads: its own `input`, or the closest earlier data stage of the
pipeline (questions -> language -> dedup -> solvability -> difficulty -> responses -> reward ->
selection). The upstream string names that stage's commit (hash + finish time), so re-running
an upstream stage re-runs everything after it, and only that."""

from __future__ import annotations

from typing import Optional

from .config import CHAIN, RunConfig
from .storage import InputError, Storage


def previous_stage(cfg: RunConfig, stage: str) -> Optional[str]:
    earlier = CHAIN[:CHAIN.index(stage)]
    for s in reversed(earlier):
        if s in cfg.pipeline:
            return s
    return None


def stage_input(cfg: RunConfig, storage: Storage, stage: str) -> tuple[str, str]:
    """(URI of the rows `stage` reads, upstream identity for its fingerprint)."""
    section = getattr(cfg.stages, stage)
    if getattr(section, "input", None):
        return section.input, "input:" + section.input
    prev = previous_stage(cfg, stage)
    if prev is None:
        raise InputError(f"stages.{stage}.input is not set and no earlier data stage is in the pipeline")
    m = storage.manifest(prev)
    if m is None:
        raise InputError(f"the {prev} stage has not finished in this run root; run it first or set stages.{stage}.input")
    if m["rows"] == 0:
        raise InputError(f"the {prev} stage kept no rows ({m['excluded_rows']} excluded: "
                         f"{m.get('excluded_by_reason', {})}); nothing for {stage}")
    return storage.uri(prev, "data"), f"{prev}:{m['config_hash']}:{m['finished_at']}"


def upstream_of(cfg: RunConfig, storage: Storage, stage: str) -> Optional[str]:
    """The upstream identity, or None where it cannot be known yet (the stage's build raises)."""
    try:
        return stage_input(cfg, storage, stage)[1]
    except InputError:
        return None


def with_ids(table):
    """Give rows without a query_id the stable hash of their text (as the responses stage does)."""
    import pyarrow as pa

    from .stages.responses import stable_query_id

    if "query_id" in table.column_names:
        ids = [str(i) if i is not None and str(i) else stable_query_id(q or "")
               for i, q in zip(table["query_id"].to_pylist(), table["query"].to_pylist())]
        return set_columns(table, {"query_id": pa.array(ids, pa.string())})
    ids = [stable_query_id(q or "") for q in table["query"].to_pylist()]
    return table.append_column("query_id", pa.array(ids, pa.string()))


def set_columns(table, columns: dict):
    """Add or replace columns (pyarrow arrays), keeping the others and their types as they are."""
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table
