"""Batched model scoring, two engines behind one function (`score`):

- vLLM (`engine: vllm`, the default for sequence-classification models): Ray Data LLM's classify
  task on the same replica pools, resources and autoscaling as generation, continuous batching
  with no padding; raw head outputs (pooling param `use_activation: false`).
- an HF actor pool (`engine: hf`, and always for `method: get_scores` / remote-code models such as
  the paper's InternLM2 reward, which vLLM does not run): one model per actor, each pads a
  length-sorted batch and runs it in one forward pass (bf16 on GPU).

Used by the difficulty stage (a regression head on the bare question) and the reward stage (a
reward model on the question + response). The reference scored one row at a time with a plain
HF model per GPU. Both engines score the same token ids (`encode`): the texts and truncation are
built by the same functions, so the two rank rows alike (tests/test_scoring).
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from .config import ModelConfig


def score_text(tokenizer, query: str, response: Optional[str], pairs: bool) -> str:
    """What a scorer reads: the bare question (difficulty), or the (question, response) chat in the
    model's own template (reward; the paper scored the bare question, no solver instruction)."""
    if not pairs:
        return query
    chat = [{"role": "user", "content": query}, {"role": "assistant", "content": response or ""}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False)
    return f"{query}\n\n{response or ''}"


def encode_kwargs(pairs: bool, max_length: int) -> dict:
    # A rendered chat template already carries its special tokens; a bare question gets the
    # tokenizer's own (BOS). Truncation keeps the first max_length tokens.
    return {"truncation": True, "max_length": max_length, "add_special_tokens": not pairs}


def scoring_engine(method: str, engine: str, model: ModelConfig) -> str:
    """`vllm` or `hf`: vLLM's classify task serves sequence-classification models; `get_scores`
    and remote-code models (InternLM2-Reward) stay on the HF pool."""
    if engine == "hf" or method == "get_scores" or model.engine.trust_remote_code:
        return "hf"
    return "vllm"


def actor_options(model: ModelConfig) -> dict:
    from ray.data import ActorPoolStrategy

    s = model.scale
    # `compute=`, not `concurrency=` (deprecated since Ray 2.51, a warning on every scoring stage).
    opts = {"compute": ActorPoolStrategy(min_size=s.replicas[0], max_size=s.replicas[1]),
            "batch_size": s.batch_size, "num_cpus": s.cpus_per_replica}
    if s.gpus_per_replica:
        opts["num_gpus"] = s.gpus_per_replica
    if s.accelerator_type:
        opts["accelerator_type"] = s.accelerator_type
    if s.resources:
        opts["resources"] = dict(s.resources)
    return opts


class Scorer:
    """Callable class for `map_batches`: adds a float column `out` scored from `query` (and
    `response` when `pairs`)."""

    def __init__(self, model_path: str, endpoint: Optional[str], out: str, pairs: bool, method: str,
                 max_length: int, dtype: str, trust_remote_code: bool, device_batch: int = 16,
                 threads: Optional[int] = None):
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        from .models import local_model

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        path = local_model(model_path, endpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding: positions of real tokens do not depend on the batch (left padding would
        # shift them, so scores would change with batch size); the head reads the last real token.
        self.tokenizer.padding_side = "right"
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                       "auto": "auto"}.get(dtype, torch.float32)
        cls = AutoModel if method == "get_scores" else AutoModelForSequenceClassification
        self.model = cls.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        if method != "get_scores" and self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.out, self.pairs, self.method, self.max_length = out, pairs, method, max_length
        self.device_batch = device_batch

    def score(self, queries: list[str], responses: Optional[list[Optional[str]]] = None) -> list[float]:
        import torch

        responses = responses if responses is not None else [None] * len(queries)
        if self.method == "get_scores":
            chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": r or ""}]
                     for q, r in zip(queries, responses)]
            with torch.inference_mode():
                scores = self.model.get_scores(chats, self.tokenizer)
            return [float(s) for s in (scores if isinstance(scores, (list, tuple)) else [scores])]
        texts = [score_text(self.tokenizer, q, r, self.pairs) for q, r in zip(queries, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.device_batch):
                idx = order[start:start + self.device_batch]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                     **encode_kwargs(self.pairs, self.max_length)).to(self.device)
                logits = self.model(**enc).logits.float()[:, 0].tolist()
                for i, s in zip(idx, logits):
                    scores[i] = s
        return scores

    def __call__(self, table: pa.Table) -> pa.Table:
        from .columns import set_columns

        queries = [q or "" for q in table["query"].to_pylist()]
        responses = table["response"].to_pylist() if self.pairs else None
        return set_columns(table, {self.out: pa.array(self.score(queries, responses), pa.float64())})


# --- vLLM (Ray Data LLM, task_type="classify") -------------------------------------------------

_TOKENIZERS: dict = {}  # per worker process: tokenizers are loaded once, not once per task


class _Tokenize:
    """Batch -> the token ids the scorer reads (`tokenized_prompt`), as the HF path builds them."""

    def __init__(self, model_path: str, endpoint: Optional[str], pairs: bool, max_length: int):
        self.model_path, self.endpoint, self.pairs, self.max_length = model_path, endpoint, pairs, max_length

    def __call__(self, table: pa.Table) -> pa.Table:
        from .columns import set_columns
        from .models import load_tokenizer

        key = (self.model_path, self.endpoint)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = load_tokenizer(self.model_path, self.endpoint)
        tok = _TOKENIZERS[key]
        queries = [q or "" for q in table["query"].to_pylist()]
        responses = table["response"].to_pylist() if self.pairs else [None] * len(queries)
        texts = [score_text(tok, q, r, self.pairs) for q, r in zip(queries, responses)]
        ids = tok(texts, **encode_kwargs(self.pairs, self.max_length))["input_ids"]
        return set_columns(table, {"tokenized_prompt": pa.array(ids, pa.list_(pa.int64()))})


def _pooling_request(row: dict) -> dict:
    # Raw head outputs: without use_activation=False vLLM applies a sigmoid to a one-label head.
    return {"tokenized_prompt": row.pop("tokenized_prompt"), "pooling_params": {"use_activation": False}, **row}


class _ScoreColumn:
    def __init__(self, out: str):
        self.out = out

    def __call__(self, table: pa.Table) -> pa.Table:
        from .columns import set_columns

        emb = table["embeddings"].to_pylist() if "embeddings" in table.column_names else [None] * table.num_rows
        errors = (table["__inference_error__"].to_pylist() if "__inference_error__" in table.column_names
                  else [None] * table.num_rows)
        scores = [None if e or v is None else float(v[0]) for v, e in zip(emb, errors)]
        keep = [c for c in table.column_names if c not in ("embeddings", "tokenized_prompt", "pooling_params",
                                                            "__inference_error__", "prompt")]
        return set_columns(table.select(keep), {self.out: pa.array(scores, pa.float64()),
                                                "score_error": pa.array([e or None for e in errors], pa.string())})


def score(ds, model: ModelConfig, out: str, pairs: bool, method: str, max_length: int, engine: str,
          endpoint: Optional[str]):
    """`ds` with a float column `out` (and `score_error`, null unless the engine failed on a row),
    scored on vLLM replicas or the HF actor pool (`scoring_engine`)."""
    if scoring_engine(method, engine, model) == "hf":
        return ds.map_batches(
            Scorer, batch_format="pyarrow", **actor_options(model),
            fn_constructor_kwargs=dict(model_path=model.path, endpoint=endpoint, out=out, pairs=pairs, method=method,
                                       max_length=max_length, dtype=model.engine.dtype,
                                       trust_remote_code=model.engine.trust_remote_code,
                                       threads=max(1, int(model.scale.cpus_per_replica)))
        ).map_batches(lambda t: _with_null_errors(t), batch_format="pyarrow")
    from .engine import build_llm, keep_all

    length = min(max_length, model.engine.max_model_len)
    tokenized = ds.map_batches(_Tokenize(model.path, endpoint, pairs, length), batch_format="pyarrow")
    processor = build_llm(model, _pooling_request, keep_all, endpoint, task_type="classify")
    return processor(tokenized).map_batches(_ScoreColumn(out), batch_format="pyarrow")


def _with_null_errors(table: pa.Table) -> pa.Table:
    from .columns import set_columns

    return set_columns(table, {"score_error": pa.nulls(table.num_rows, pa.string())})
