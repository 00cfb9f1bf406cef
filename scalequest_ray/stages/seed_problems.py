"""Seed problems for question fine-tuning (ScaleQuest stage 1's data): questions only.

Sources: an HF hub dataset (the paper: GSM8K `main` train + MATH train, ~15K), local or S3
Parquet/JSONL, or the real competition problems shipped in the `champ-dataset` package (the
offline default). Solutions are never carried over; whitespace is normalised; exact duplicates
(after normalisation, across all sources) go to the exclusions output with reason `duplicate`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa

from ..config import RunConfig, SeedSource
from ..columns import REASON, TOKENS
from .. import shuffle
from ..stage import Stage, StageInput
from ..storage import Storage, read_input

SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("query", pa.string()),
    ("source", pa.string()),
    (TOKENS, pa.int64()),
    (REASON, pa.string()),
])

_WS = re.compile(r"[ \t\r\f\v]+")


def normalize_question(text) -> str:
    """Collapse runs of spaces/tabs, trim each line, drop blank-line runs; keep line structure."""
    if not isinstance(text, str):
        return ""
    lines = [_WS.sub(" ", line).strip() for line in text.split("\n")]
    out, blank = [], False
    for line in lines:
        if line:
            out.append(line)
            blank = False
        elif not blank and out:
            out.append("")
            blank = True
    return "\n".join(out).strip()


def champ_problems() -> list[dict]:
    import champ_dataset

    path = Path(champ_dataset.__file__).parent / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text())["problems"]
    return [{"question": p["_text"], "answer": p.get("_answer")} for p in problems.values()]


def _source_dataset(src: SeedSource, endpoint):
    import ray

    wanted = [src.question_column] + ([src.answer_column] if src.answer_column else [])
    if src.builtin == "champ":
        if not set(wanted) <= {"question", "answer"}:
            _missing(src, "champ-dataset:v0", ["question", "answer"])
        # One block: from_items makes one block per item (270 map tasks, ~35 s of task overhead).
        rows = champ_problems()
        table = pa.table({c: [p[c] for p in rows] for c in wanted})
        return ray.data.from_arrow(table), "champ-dataset:v0", src.question_column
    if src.hub:
        import datasets

        hf = datasets.load_dataset(src.hub, src.subset, split=src.split)
        missing = [c for c in wanted if c not in hf.column_names]
        if missing:
            _missing(src, f"hub dataset {src.hub}", hf.column_names)
        return ray.data.from_huggingface(hf.select_columns(wanted)), \
            f"hub:{src.hub}:{src.subset or ''}:{src.split}", src.question_column
    ds = read_input(src.path, endpoint, required_column=src.question_column)
    if src.answer_column and src.answer_column not in ds.schema().names:
        _missing(src, f"input {src.path}", ds.schema().names)
    return ds, f"file:{src.path}", src.question_column


def _missing(src: SeedSource, what: str, columns) -> None:
    from ..storage import InputError

    wanted = [src.question_column] + ([src.answer_column] if src.answer_column else [])
    gone = [c for c in wanted if c not in columns]
    raise InputError(f"{what} has no '{gone[0]}' column (columns: {', '.join(columns)})")


def _prepare(batch: pd.DataFrame, column: str, source: str, max_chars: int, wellformed_only: bool) -> pd.DataFrame:
    from ..quality import wellformed_reason

    queries = [normalize_question(q) for q in batch[column]]
    reasons = ["empty_query" if not q else "query_too_long" if len(q) > max_chars else None for q in queries]
    if wellformed_only:
        reasons = [r or (f"not_wellformed:{why}" if (why := wellformed_reason(q)) else None)
                   for r, q in zip(reasons, queries)]
    return pd.DataFrame({
        "query_id": ["seed-" + hashlib.sha1(q.encode()).hexdigest()[:16] for q in queries],
        "query": queries, "source": source, TOKENS: 0, REASON: reasons,
    })


def _mark_duplicates(group: pd.DataFrame) -> pd.DataFrame:
    """All rows of one normalised question: the first usable one is kept, the rest are duplicates."""
    group = group.sort_values(["source"], kind="stable").reset_index(drop=True)
    usable = group[REASON].isna()
    if usable.any():
        first = usable.idxmax()
        dup = usable & (group.index != first)
        group.loc[dup, REASON] = "duplicate"
    return group


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    scfg = cfg.stages.seed_problems
    parts = []
    for src in scfg.sources:
        ds, name, column = _source_dataset(src, cfg.storage.endpoint_url)
        parts.append(ds.map_batches(_prepare, batch_format="pandas",
                                    fn_kwargs={"column": column, "source": name, "max_chars": scfg.max_chars,
                                               "wellformed_only": scfg.wellformed_only}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # query_id is the hash of the normalised text: grouping by it finds exact duplicates across
    # sources without collecting anything on the driver.
    return shuffle.groupby(ds, "query_id", shuffle.partitions()).map_groups(_mark_duplicates, batch_format="pandas").map_batches(
        lambda t: pa.Table.from_pandas(t, schema=SCHEMA, preserve_index=False), batch_format="pandas")


STAGE = Stage("seed_problems", build, unit="seed problems")
