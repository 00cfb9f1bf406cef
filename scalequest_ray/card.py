"""The final dataset as a Hugging Face dataset: a card (README.md with the hub's YAML front matter)
in <root>/selection, and its upload.

The card's `configs` entry points `datasets.load_dataset(<root>/selection)` and the hub viewer
at data/*.parquet only: without it the loader would also pick up jsonl/ and exclusions/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq
import yaml

from .config import TRAINING_STAGES, stage_kind
from .storage import InputError
from .cost import cfg_models, head, manifests, models_of, parquet_files, read_json, resolve, write_text

# The hub's size_categories labels: (upper bound, label); past the last, "n>1T".
SIZE_LABELS = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (1e7, "1M<n<10M"),
               (1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (1e10, "1B<n<10B"), (1e11, "10B<n<100B"),
               (1e12, "100B<n<1T")]
# Where a stage records the model paths that made its rows (later stages carry these columns on:
# only the stage that wrote one is named after it).
MODEL_COLUMNS = {"questions": ["generator_model"], "qpo_pairs": ["generator_model", "optimizer"],
                 "solvability": ["judge_model"], "responses": ["solver_model"], "reward": ["reward_model"]}
UPLOAD = ["README.md", "data/*.parquet", "jsonl/*.jsonl", "jsonl/*.json"]


def size_category(n: int) -> str:
    return next((label for bound, label in SIZE_LABELS if n < bound), "n>1T")


def _raw(cfg: Any) -> dict:
    if cfg is None:
        return {}
    return cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(cfg)


def _models(root: str, stage: str, m: dict, paths: dict) -> list[str]:
    """What ran a stage: its section's models (their paths when the config is given) and the
    model paths its rows recorded."""
    section = m.get("config") or {}
    named = list(dict.fromkeys(f"{n} ({paths[n]['path']})" if n in paths else n for n in models_of(section)))
    if stage_kind(stage) in TRAINING_STAGES:
        return [f"{n} -> {m['model']}" for n in named] if m.get("model") else named
    columns = MODEL_COLUMNS.get(stage_kind(stage), [])
    recorded = head(root, stage, "data", columns, 1000).to_pydict() if columns else {}
    seen = sorted({v for values in recorded.values() for v in values if v})
    return named + [p for p in seen if not any(p in n for n in named)]


def _sampling(section: dict) -> dict:
    return {k: v for k, v in section.items() if k.endswith("sampling") and isinstance(v, dict)} | (
        {"n": section["n"]} if "n" in section else {})


def _front_matter(rows: int, license: str, languages: list[str]) -> dict:
    return {
        "license": license,
        **({"language": languages} if languages else {}),
        "size_categories": [size_category(rows)],
        "task_categories": ["question-answering", "text-generation"],
        "tags": ["math", "synthetic", "scalequest"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    }


def _body(root: str, found: dict, rows: int, raw: dict, schema) -> list[str]:
    paths = cfg_models(raw)
    lines = [f"# {raw.get('name') or 'ScaleQuest'} math question/answer pairs", "",
             f"{rows:,} question/response pairs synthesised from scratch with the ScaleQuest method "
             "(Ding et al., arXiv 2410.18693) by scalequest-ray.", "",
             "```python", "from datasets import load_dataset", "ds = load_dataset(\"<this repo or folder>\")", "```",
             "", "## Columns", "", "| column | type |", "|---|---|"]
    lines += [f"| `{f.name}` | {f.type} |" for f in schema]
    lines += ["", "## Provenance", "",
              f"Run seed: {raw['seed'] if 'seed' in raw else 'not recorded (no run config given)'}", "",
              "| stage | models | sampling | config hash |", "|---|---|---|---|"]
    for stage, m in found.items():
        sampling = json.dumps(_sampling(m.get("config") or {}), sort_keys=True)
        lines.append(f"| {stage} | {'<br>'.join(_models(root, stage, m, paths)) or '-'} | "
                     f"`{sampling}` | `{m.get('config_hash', '-')}` |")
    funnel = (read_json(root, "funnel.json") or {}).get("stages", [])
    if funnel:
        lines += ["", "## Funnel", "", "| stage | unit | rows in | kept | dropped by reason |", "|---|---|---|---|---|"]
        for r in funnel:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r["dropped_by_reason"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {r['stage']} | {r['unit']} | {r['rows_in']} | {r['kept']} | {reasons or '-'} |")
    return lines


def write_card(root: str, cfg: Any = None, license: str = "apache-2.0") -> str:
    """Write <root>/selection/README.md (root local or s3://, within cost.endpoint(...)) from the
    run's manifests (and its config, a RunConfig or dict, when given: model paths, run seed);
    return its path."""
    found = manifests(root)
    files = parquet_files(root, "selection", "data")
    if "selection" not in found or not files:
        raise InputError(f"{root}: no finished selection stage, nothing to describe")
    rows = found["selection"].get("rows")
    fs, _ = resolve(root)
    if rows is None:
        rows = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    raw = _raw(cfg)
    languages = (found.get("language", {}).get("config") or {}).get("languages") or \
        ((raw.get("stages") or {}).get("language") or {}).get("languages") or []
    front = yaml.safe_dump(_front_matter(rows, license, languages), sort_keys=False)
    body = _body(root, found, rows, raw, pq.read_schema(files[0], filesystem=fs))
    return write_text(root, "selection/README.md", f"---\n{front}---\n\n" + "\n".join(body) + "\n")


def upload_files(folder: Path) -> list[str]:
    return sorted({str(p.relative_to(folder)) for pattern in UPLOAD for p in folder.glob(pattern) if p.is_file()})


def publish(root: str, repo_id: str, token_env: str = "HF_TOKEN", dry_run: bool = False,
            private: Optional[bool] = True) -> list[str]:
    """Upload <root>/selection's README.md, data/*.parquet and jsonl/ to the dataset repo
    `repo_id` (created if missing, private by default); return the files. The token is read
    from the environment variable `token_env` and handed to huggingface_hub only."""
    folder = Path(root) / "selection"
    if not (folder / "README.md").is_file():
        raise InputError(f"{folder}: no README.md (write the card first: card.write_card)")
    files = upload_files(folder)
    if dry_run:
        return files
    token = os.environ.get(token_env)
    if not token:
        raise InputError(f"environment variable {token_env} is not set: put a Hugging Face write token in it")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="dataset", allow_patterns=UPLOAD,
                      commit_message="scalequest-ray: dataset and card")
    return files
