"""What a finished run cost, from its manifests' `resources` (ledger.py), and what the same config
at full size would cost, extrapolated from the tokens the small run measured.

Also the few readers of a run root that report.py and card.py share. They go through pyarrow
filesystems (storage.resolve), so an s3:// root only needs its filesystem, not new readers.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import posixpath
from typing import Any, Optional, get_args

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import CHAIN, STAGES, TRAINING_STAGES, RunConfig, stage_kind
from .storage import MANIFEST
from .storage import resolve as _resolve

# The S3 endpoint of the run root being read (None: AWS, or the AWS_ENDPOINT_URL* environment):
# set for the duration of a call with `endpoint(...)`, so every reader below reaches the same store.
_ENDPOINT: contextvars.ContextVar = contextvars.ContextVar("scalequest_ray_cost_endpoint", default=None)


@contextlib.contextmanager
def endpoint(url: Optional[str]):
    token = _ENDPOINT.set(url)
    try:
        yield
    finally:
        _ENDPOINT.reset(token)


def resolve(root: str):
    return _resolve(root, _ENDPOINT.get())


def write_text(root: str, rel: str, text: str) -> str:
    """Write <root>/<rel> (local or S3); returns its path or URI."""
    fs, base = resolve(root)
    path = posixpath.join(base, rel)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))
    return ("s3://" + path) if root.startswith("s3://") else path

ORDER = get_args(STAGES)  # the kinds in pipeline order: a run's stages are listed in this order
HEAD_FILES = 32           # a sample reads the first rows of at most this many files, spread over the list

# Per-GPU throughput, tokens/s: "generate" counts output tokens (prefill is inside the published
# figure, measured at ~462 in / 256 out), "score" counts the tokens a scorer reads (prompt + response).
# Override with estimate(..., throughput={"generate": {"H200": 12000}}) or a flat {"generate": 2200}.
THROUGHPUT: dict[str, dict[str, float]] = {
    "generate": {"A100": 3800.0, "H100": 7900.0, "default": 3800.0},
    "score": {"A100": 6200.0, "default": 6200.0},
}
THROUGHPUT_SOURCES = {
    "generate/A100": "vLLM blog 2024-09-05 performance update, Llama-3-8B offline (read off its chart)",
    "generate/H100": "vLLM blog 2024-09-05 performance update, Llama-3-8B offline (read off its chart)",
    "score/A100": "ScaleQuest's own reward scoring: 5M x ~500 tokens in 112 A100-hours (batch 1, HF)",
}
# What the reference itself achieved per A100 (its Table 4): pass as `throughput` to reproduce it.
PAPER_THROUGHPUT = {"generate": {"A100": 2200.0, "default": 2200.0}, "score": {"A100": 6200.0, "default": 6200.0}}

# The paper's Table 4 (8x A100-40G PCIe, ~$1.30/GPU-hour) and the stage kinds each row covers.
PAPER_TABLE4 = [
    ("QFT (x2 generators)", ("qft",), 3.9),
    ("QPO question generation", ("qpo_pairs",), 0.4),
    ("QPO training", ("qpo",), 6.6),
    ("question generation", ("questions",), 38.4),
    ("solvability + difficulty", ("solvability", "difficulty"), 110.6),
    ("response generation", ("responses",), 251.0),
    ("reward scoring", ("reward",), 112.0),
]
PAPER_TOTAL, PAPER_DOLLARS, PAPER_PRICE = 522.9, 681, 1.30
# Where a stage records the prompt tokens of its OWN requests. Rows of later stages still carry the
# num_input_tokens of the stage that generated them (columns pass through), which are not theirs.
INPUT_TOKENS = {"questions": "num_input_tokens", "responses": "num_input_tokens", "qpo_pairs": "prompt_tokens"}
# Our stages with no row in Table 4 (CPU work, or the scorer the reference never released).
NOT_IN_PAPER = ("seed_problems", "language", "dedup", "difficulty_labels", "difficulty_scorer", "selection")


# reading a run root -------------------------------------------------------------------------
def read_json(root: str, *parts: str) -> Optional[dict]:
    fs, base = resolve(root)
    path = posixpath.join(base, *parts)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def order_key(stage: str) -> tuple:
    kind = stage_kind(stage)
    return (ORDER.index(kind) if kind in ORDER else len(ORDER), stage)


def manifests(root: str) -> dict[str, dict]:
    """Every finished stage's manifest, in pipeline order (a stage is finished iff it has one)."""
    fs, base = resolve(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return {}
    folders = [i.base_name for i in fs.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.Directory]
    found = {s: read_json(root, s, MANIFEST) for s in sorted(folders, key=order_key)}
    return {s: m for s, m in found.items() if m is not None}


def parquet_files(root: str, stage: str, sub: str) -> list[str]:
    fs, base = resolve(root)
    folder = posixpath.join(base, stage, sub)
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def head(root: str, stage: str, sub: str, columns: list[str], limit: int) -> pa.Table:
    """At most `limit` rows of `columns` (those that exist) of <stage>/<sub>/*.parquet: the first
    rows of up to HEAD_FILES files spread evenly over the sorted list, so a sample of a large stage
    costs a few reads and still spans its write tasks (and generators). Not a uniform sample."""
    fs, _ = resolve(root)
    files = parquet_files(root, stage, sub)
    if len(files) > HEAD_FILES:
        files = [files[i * len(files) // HEAD_FILES] for i in range(HEAD_FILES)]
    per_file = max(1, -(-limit // max(len(files), 1)))
    parts: list[pa.Table] = []
    for path in files:
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            if not cols:
                continue
            batch = next(pf.iter_batches(batch_size=per_file, columns=cols), None)
            if batch is not None:
                parts.append(pa.Table.from_batches([batch]))
    if not parts:
        return pa.table({})
    return pa.concat_tables(parts, promote_options="permissive").slice(0, limit)


def mean_column(root: str, stage: str, column: str, limit: int = 20000) -> Optional[float]:
    """Mean of a numeric column over a sample of kept and excluded rows, None if absent."""
    values = [v for sub in ("data", "exclusions")
              for v in head(root, stage, sub, [column], limit).to_pydict().get(column, []) if v is not None]
    return sum(values) / len(values) if values else None


# what a finished run cost -------------------------------------------------------------------
def models_of(section: dict) -> list[str]:
    return [g.get("model") for g in section.get("generators") or []] + [
        section[k] for k in ("model", "generator", "optimizer_model") if isinstance(section.get(k), str)]


def cfg_models(cfg: Any) -> dict:
    if cfg is None:
        return {}
    raw = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
    return raw.get("models") or {}


def accelerator(section: dict, cfg: Any = None) -> Optional[str]:
    """The accelerator a stage ran on: a training section's `accelerator_type:X` resource, else the
    scale.accelerator_type of the first model it uses that names one (needs the run's config)."""
    for key in (section.get("resources") or {}):
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    models = cfg_models(cfg)
    for name in models_of(section):
        acc = ((models.get(name) or {}).get("scale") or {}).get("accelerator_type")
        if acc:
            return acc
    return None


def _dollars(row: dict, prices: Optional[dict]) -> Optional[float]:
    """Node types all priced (prices keyed by node type): node-hours x price, what a cloud bills.
    Else GPU-hours x price[accelerator or "default"] + CPU-hours of GPU-less pools x price["cpu"]
    (the CPUs a GPU replica holds come with the GPU's price)."""
    if prices is None:
        return None
    nodes = row["node_hours"]
    if nodes and all(t in prices for t in nodes):
        return round(sum(h * prices[t] for t, h in nodes.items()), 4)
    gpu_price = prices.get(row["accelerator"] or "default", prices.get("default"))
    if row["gpu_hours"] > 0 and gpu_price is None:
        return None
    return round(row["gpu_hours"] * (gpu_price or 0) + row["cpu_only_hours"] * prices.get("cpu", 0), 4)


def cost_table(root: str, prices: Optional[dict] = None, cfg: Any = None) -> list[dict]:
    """One row per finished stage (data and training) from its manifest's `resources`. `cfg` (a
    RunConfig or its dict) tells which accelerator a data stage's models ran on."""
    rows = []
    for stage, m in manifests(root).items():
        res = m.get("resources") or {}
        pools = res.get("pools") or {}
        row = {
            "stage": stage,
            "kind": "training" if stage_kind(stage) in TRAINING_STAGES else "data",
            "accelerator": accelerator(m.get("config") or {}, cfg),
            "wall_seconds": float(m.get("seconds") or 0.0),
            "cpu_hours": (res.get("cpu_seconds") or 0.0) / 3600,
            "gpu_hours": (res.get("gpu_seconds") or 0.0) / 3600,
            "cpu_only_hours": sum(p.get("cpu_seconds", 0.0) for p in pools.values() if not p.get("gpus_each")) / 3600,
            "node_hours": {t: s / 3600 for t, s in (res.get("node_seconds") or {}).items()},
            "replicas": {name: p.get("replicas", {}) for name, p in pools.items()},
        }
        row["cost"] = _dollars(row, prices)
        rows.append(row)
    return rows


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:  # the first column (names) left, the numbers right
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def _money(v: Optional[float]) -> str:
    return "-" if v is None else f"${v:,.2f}"


def format_cost(rows: list[dict]) -> str:
    body = [[r["stage"], r["accelerator"] or "-", f"{r['wall_seconds']:.1f}", f"{r['cpu_hours']:.3f}",
             f"{r['gpu_hours']:.3f}", ", ".join(f"{t}={h:.3f}" for t, h in r["node_hours"].items()) or "-",
             _money(r["cost"])] for r in rows]
    known = [r["cost"] for r in rows if r["cost"] is not None]
    body.append(["total", "", f"{sum(r['wall_seconds'] for r in rows):.1f}", f"{sum(r['cpu_hours'] for r in rows):.3f}",
                 f"{sum(r['gpu_hours'] for r in rows):.3f}", "", _money(sum(known)) if known else "-"])
    return _table(["stage", "accel", "wall s", "CPU-h", "GPU-h", "node-h", "$"], body)


# what the full-size run would cost ----------------------------------------------------------
def _rate(throughput: dict, workload: str, acc: Optional[str]) -> float:
    table = throughput[workload]
    return table.get(acc or "default", table["default"])


def _merged(override: Optional[dict]) -> dict:
    out = {k: dict(v) for k, v in THROUGHPUT.items()}
    for workload, value in (override or {}).items():
        if isinstance(value, dict):
            out.setdefault(workload, {}).update(value)
        else:  # a flat number: that rate on every accelerator
            out[workload] = {"default": float(value)}
    return out


def _size(kind: str, section: dict) -> Optional[float]:
    """The knob that sets how many rows a stage makes by itself (None: its input decides)."""
    if kind == "questions":
        return float(sum(g["num_questions"] for g in section.get("generators") or []))
    if kind == "qpo_pairs":
        return float(section["num_questions"])
    if kind == "difficulty_labels":  # k solutions per problem (max_problems: see _scale)
        return float(section.get("k") or 1)
    return None


# Rows of the train splits the paper's configs read (their dataset cards), so that an estimate of
# a config with no max_problems knows how many problems it labels without fetching them.
KNOWN_SPLIT_ROWS = {
    ("openai/gsm8k", "main", "train"): 7473,
    ("EleutherAI/hendrycks_math", "algebra", "train"): 1744,
    ("EleutherAI/hendrycks_math", "counting_and_probability", "train"): 771,
    ("EleutherAI/hendrycks_math", "geometry", "train"): 870,
    ("EleutherAI/hendrycks_math", "intermediate_algebra", "train"): 1295,
    ("EleutherAI/hendrycks_math", "number_theory", "train"): 869,
    ("EleutherAI/hendrycks_math", "prealgebra", "train"): 1205,
    ("EleutherAI/hendrycks_math", "precalculus", "train"): 746,
    ("builtin", "champ", None): 270,
}


def _source_rows(sources: list[dict]) -> Optional[float]:
    """Problems in `sources` when every one is a split of known size, else None."""
    total = 0
    for src in sources:
        key = ("builtin", src["builtin"], None) if src.get("builtin") else (src.get("hub"), src.get("subset"), src.get("split"))
        if key not in KNOWN_SPLIT_ROWS:
            return None
        total += KNOWN_SPLIT_ROWS[key]
    return float(total) or None


def _scale(stage: str, section: dict, measured: dict, upstream: float) -> float:
    """Full-size rows / measured rows: a stage's own size knob against the small run's, times its
    input's scale for chain stages (the keep shares measured are assumed to hold at size)."""
    kind, was = stage_kind(stage), measured.get("config") or {}
    own, before = _size(kind, section), _size(kind, was)
    if own is not None:
        ratio = own / before if before else 1.0
        if kind == "difficulty_labels":
            labelled = measured.get("rows", 0) + measured.get("excluded_rows", 0)  # problems, k answers each
            problems = section.get("max_problems") or _source_rows(section.get("sources") or [])
            if problems and labelled:
                ratio *= problems / labelled
        return ratio
    scale = 1.0 if section.get("input") else upstream
    if kind == "responses" and was.get("n"):
        scale *= section.get("n", 5) / was["n"]
    return scale


def _per_row(m: dict) -> float:
    return (m.get("output_tokens") or 0) / max(m.get("rows", 0) + m.get("excluded_rows", 0), 1)


def _scored_tokens(kind: str, found: dict) -> Optional[float]:
    """Tokens a scorer reads per row, from the stages that generated them (scoring stages record
    none): the question (difficulty), or the question plus the response (reward)."""
    q = _per_row(found["questions"]) if "questions" in found else None
    if kind == "difficulty":
        return q
    if "responses" in found:
        return _per_row(found["responses"]) + (q or 0)
    return None


def input_tokens_per_row(root: str, stage: str) -> Optional[float]:
    column = INPUT_TOKENS.get(stage_kind(stage))
    return mean_column(root, stage, column) if column else None


def estimate(cfg: RunConfig, root: str, throughput: Optional[dict] = None) -> list[dict]:
    """GPU-hours per stage of `cfg.pipeline` at cfg's sizes: rows x measured tokens per row (from
    the finished run at `root`) / per-GPU throughput. Training stages are not extrapolated (their
    cost follows examples and steps, not tokens): their measured GPU-hours are shown."""
    from .stages import registry

    specs, found, rates = registry(), manifests(root), _merged(throughput)
    raw = cfg.model_dump(mode="json")
    sections = {s: sec.model_dump(mode="json") for s, sec in cfg.stages.sections().items()}
    rows, upstream = [], 1.0
    for stage in cfg.pipeline:
        kind, section = stage_kind(stage), sections[stage]
        m = found.get(stage) or next((v for s, v in found.items() if stage_kind(s) == kind), None)
        row = {"stage": stage, "kind": kind, "workload": None, "target_rows": None, "tokens_per_row": None,
               "input_tokens_per_row": None, "tok_s": None, "accelerator": accelerator(section, raw),
               "gpu_hours": None, "note": "",
               "measured_gpu_hours": (m.get("resources") or {}).get("gpu_seconds", 0) / 3600 if m else None}
        rows.append(row)
        if kind in TRAINING_STAGES:
            row.update(workload="train", note="training: not extrapolated")
            continue
        if m is None:
            row["note"] = "not measured in the run root"
            continue
        scale = _scale(stage, section, m, upstream)
        if kind in CHAIN:
            upstream = scale
        row["target_rows"] = round((m.get("rows", 0) + m.get("excluded_rows", 0)) * scale)
        runs_on = specs[kind].runs_on if kind in specs else "cpu"
        if runs_on == "cpu":
            row.update(workload="cpu", gpu_hours=0.0, note="CPU only")
            continue
        workload = "generate" if runs_on == "engine" else "score"
        per_row = _per_row(m) if workload == "generate" else _scored_tokens(kind, found)
        row.update(workload=workload, tokens_per_row=per_row, tok_s=_rate(rates, workload, row["accelerator"]),
                   input_tokens_per_row=input_tokens_per_row(root, m["stage"]))
        if per_row is None:
            row["note"] = "no token counts to extrapolate from"
            continue
        row["gpu_hours"] = row["target_rows"] * per_row / row["tok_s"] / 3600
    return rows


def _hours(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:,.1f}"


def format_estimate(rows: list[dict]) -> str:
    """The estimate per stage, then next to the paper's Table 4 (A100-40G GPU-hours)."""
    body = [[r["stage"], r["workload"] or "-", "-" if r["target_rows"] is None else f"{r['target_rows']:,}",
             "-" if r["tokens_per_row"] is None else f"{r['tokens_per_row']:.0f}",
             "-" if r["tok_s"] is None else f"{r['tok_s']:,.0f}", r["accelerator"] or "default",
             _hours(r["gpu_hours"]), r["note"]] for r in rows]
    ours = _table(["stage", "work", "rows", "tok/row", "tok/s/GPU", "accel", "GPU-h", "note"], body)
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    paper_body = []
    for label, kinds, hours in PAPER_TABLE4:
        mine = [r for k in kinds for r in by_kind.get(k, [])]
        known = [r["gpu_hours"] for r in mine if r["gpu_hours"] is not None]
        paper_body.append([label, f"{hours:.1f}", ", ".join(r["stage"] for r in mine) or "-",
                           _hours(sum(known)) if known else "-"])
    total = sum(r["gpu_hours"] for r in rows if r["gpu_hours"] is not None)
    paper_body.append(["total", f"{PAPER_TOTAL:.1f}", "", f"{total:,.1f}"])
    extra = sorted({r["stage"] for r in rows if r["kind"] in NOT_IN_PAPER})
    lines = [ours, "", "next to ScaleQuest Table 4 (8x A100-40G, GPU-hours):",
             _table(["paper row", "paper", "our stages", "ours"], paper_body),
             f"paper total {PAPER_TOTAL} GPU-hours ~ ${PAPER_DOLLARS} at ${PAPER_PRICE:.2f}/GPU-hour; "
             f"ours {total:,.1f} GPU-hours ~ ${total * PAPER_PRICE:,.0f} at the same price"
             + (" (training stages not extrapolated)" if any(r["workload"] == "train" for r in rows) else "")]
    if extra:
        lines.append(f"not in Table 4: {', '.join(extra)} (CPU work, or a scorer the reference never released)")
    return "\n".join(lines)
