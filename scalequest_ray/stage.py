"""The declaration of a data stage: one typed object per stage module (its `STAGE`), read by the
pipeline, the runner and `plan`. Like a datatrove step or a ray.data.llm processor config, it
says what the stage is; the runner owns the bookkeeping (counts, exclusions, tokens, resume)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from .columns import TOKENS

if TYPE_CHECKING:
    import pyarrow as pa

    from .config import RunConfig
    from .storage import Storage


@dataclass(frozen=True)
class StageInput:
    """What a stage reads, worked out once by the pipeline before the stage runs."""

    stage: str = ""                 # the pipeline entry being run (a named instance: qpo_pairs@qwen)
    uri: Optional[str] = None       # the rows it reads (None: it makes its own, e.g. questions)
    upstream: Optional[str] = None  # identity of what it read, part of its fingerprint
    rows_in: Optional[int] = None   # rows the upstream stage kept (None: not from a stage of this run)
    from_user_file: bool = False    # its `input` is a user's file (ids may repeat there)


@dataclass(frozen=True)
class Stage:
    name: str
    # (config, storage, input) -> Ray Dataset whose rows carry `exclude_reason` (null = kept)
    build: Callable[["RunConfig", "Storage", StageInput], object]
    # what runs it, for `plan`: "engine" (vLLM replica pool), "scoring" (actor pool), "cpu" (tasks)
    runs_on: str = "cpu"
    # a column unique per row from the stage's reads to its output: with it, a killed attempt
    # is continued without generating its written rows again
    resume_id: Optional[str] = None
    # the stage numbers its rows itself (the id is unique whatever its input holds), so it also
    # resumes over a user's file, where ids taken from the input may repeat
    resume_id_made_here: bool = False
    # the column with the tokens THIS stage generated (None: it generates none)
    tokens_column: Optional[str] = TOKENS
    unit: str = "questions"  # what a row is, in the funnel
    private_columns: tuple = ()  # dropped from the output (e.g. a resume id that is not part of it)
    # additive counts over a written file's rows (kept and excluded), summed into the manifest
    counters: Optional[Callable[["pa.Table"], dict]] = None
    # (config) -> write the kept rows as JSON Lines too, under jsonl/
    jsonl: Optional[Callable[["RunConfig"], bool]] = None
    # runs after the rows are written, before the manifest; its dict joins the manifest
    finish: Optional[Callable[["RunConfig", "Storage"], dict]] = None
