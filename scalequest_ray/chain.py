"""Which data a chain stage reads: its own `input`, or the closest earlier data stage of the
pipeline (questions -> language -> dedup -> solvability -> difficulty -> responses -> reward ->
selection). The upstream identity names that stage's commit (hash + finish time), so re-running
an upstream stage re-runs everything after it, and only that."""

from __future__ import annotations

from typing import Optional

from .config import CHAIN, RunConfig
from .stage import StageInput
from .storage import InputError, Storage


def previous_stage(cfg: RunConfig, stage: str) -> Optional[str]:
    earlier = CHAIN[:CHAIN.index(stage)]
    for s in reversed(earlier):
        if s in cfg.pipeline:
            return s
    return None


def resolve_input(cfg: RunConfig, storage: Storage, stage: str) -> StageInput:
    """What `stage` reads, from one read of the upstream manifest. Stages outside the chain (and
    questions, its head) make their own rows from their config: an empty StageInput. Raises
    InputError (one line) when a chain stage has nothing to read."""
    if stage not in CHAIN or stage == "questions":
        return StageInput(stage=stage)
    section = cfg.section(stage)
    if getattr(section, "input", None):
        return StageInput(stage=stage, uri=section.input, upstream="input:" + section.input, from_user_file=True)
    prev = previous_stage(cfg, stage)
    if prev is None:
        raise InputError(f"stages.{stage}.input is not set and no earlier data stage is in the pipeline")
    m = storage.manifest(prev)
    if m is None:
        raise InputError(f"the {prev} stage has not finished in this run root; run it first or set stages.{stage}.input")
    if m["rows"] == 0:
        raise InputError(f"the {prev} stage kept no rows ({m['excluded_rows']} excluded: "
                         f"{m.get('excluded_by_reason', {})}); nothing for {stage}")
    # selection's rows in are the questions it groups (its kept + dropped), not the candidates
    return StageInput(stage=stage, uri=storage.uri(prev, "data"), upstream=f"{prev}:{m['config_hash']}:{m['finished_at']}",
                      rows_in=None if stage == "selection" else m["rows"])
