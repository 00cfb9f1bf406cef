"""Batched model scoring as a Ray Data actor pool: one model per actor, many rows per forward.

Used by the difficulty stage (a regression head on the bare question) and the reward stage (a
reward model on the question + response). The reference scored one row at a time with a plain
HF model per GPU; here each actor pads a batch, sorted by length, and runs it in one forward
pass (bf16 on GPU), and Ray Data scales the pool between (min, max) replicas.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from .config import ModelConfig


def actor_options(model: ModelConfig) -> dict:
    s = model.scale
    opts = {"concurrency": tuple(s.replicas), "batch_size": s.batch_size, "num_cpus": s.cpus_per_replica}
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

        from .train.common import local_model

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

    def _text(self, query: str, response: Optional[str]) -> str:
        if not self.pairs:
            return query
        chat = [{"role": "user", "content": query}, {"role": "assistant", "content": response or ""}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return f"{query}\n\n{response or ''}"

    def score(self, queries: list[str], responses: Optional[list[Optional[str]]] = None) -> list[float]:
        import torch

        responses = responses if responses is not None else [None] * len(queries)
        if self.method == "get_scores":
            chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": r or ""}]
                     for q, r in zip(queries, responses)]
            with torch.inference_mode():
                scores = self.model.get_scores(chats, self.tokenizer)
            return [float(s) for s in (scores if isinstance(scores, (list, tuple)) else [scores])]
        texts = [self._text(q, r) for q, r in zip(queries, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.device_batch):
                idx = order[start:start + self.device_batch]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=not self.pairs).to(self.device)
                logits = self.model(**enc).logits.float()[:, 0].tolist()
                for i, s in zip(idx, logits):
                    scores[i] = s
        return scores

    def __call__(self, table: pa.Table) -> pa.Table:
        from .columns import set_columns

        queries = [q or "" for q in table["query"].to_pylist()]
        responses = table["response"].to_pylist() if self.pairs else None
        return set_columns(table, {self.out: pa.array(self.score(queries, responses), pa.float64())})
