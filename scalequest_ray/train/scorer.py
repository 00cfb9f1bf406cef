"""The difficulty scorer (ScaleQuest stage 3, difficulty part b; the reference never released
its scorer or training code): a base model with a one-output regression head, trained with MSE
on the difficulty labels (the solver's fail rate per problem), on Ray Train like QFT: same
DDP/DeepSpeed options, checkpoints, resume and export (<root>/difficulty_scorer/model/).

A deterministic share of the labelled problems (`holdout`) is kept out of training; the stage
reports the scorer's MSE on it next to the MSE of always predicting the mean label, so a user
can see whether the scorer learned anything."""

from __future__ import annotations

import hashlib
from typing import Optional

from ..config import RunConfig
from ..storage import InputError, Storage, read_input
from .common import common_args, read_columns, run_training, scratch_dir, train_and_export, worker_setup


def is_holdout(query_id: str, share: float) -> bool:
    return int(hashlib.sha1(query_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def train_loop(c: dict) -> None:
    """Runs on every Ray Train worker."""
    import datasets
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model, tokenizer = worker_setup(c, head="regression")
    cols = read_columns(c["data_uri"], c["endpoint"], ["query_id", "query", "fail_rate"], c["max_examples"])
    rows = [{"query": q, "label": float(y), "holdout": is_holdout(i, c["holdout"])}
            for i, q, y in zip(cols["query_id"], cols["query"], cols["fail_rate"]) if q]

    def encode(items):
        return [{**tokenizer(r["query"], truncation=True, max_length=c["max_length"]), "labels": r["label"]} for r in items]

    train = [r for r in rows if not r["holdout"]] or rows
    held = [r for r in rows if r["holdout"]]
    args_kw = common_args(c, scratch_dir(c, "scorer"))
    args_kw.pop("max_length")  # a TRL option; plain TrainingArguments has none
    args = TrainingArguments(**args_kw)

    def evaluate(trainer) -> dict:
        if not held or c["deepspeed"].startswith("zero3"):
            # (ZeRO-3 shards the weights across ranks: a rank-0-only forward pass would hang.)
            return {"holdout": len(held), "holdout_mse": None}
        model.eval()
        preds = []
        with torch.inference_mode():
            for r in held:
                enc = tokenizer(r["query"], truncation=True, max_length=c["max_length"], return_tensors="pt")
                preds.append(float(model(**enc.to(model.device)).logits.float()[0, 0]))
        labels = [r["label"] for r in held]
        mean = sum(r["label"] for r in train) / len(train)
        mse = sum((p - y) ** 2 for p, y in zip(preds, labels)) / len(held)
        baseline = sum((mean - y) ** 2 for y in labels) / len(held)
        return {"holdout": len(held), "holdout_mse": mse, "holdout_mse_predict_mean": baseline}

    train_and_export(Trainer, c, model, tokenizer, datasets.Dataset.from_list(encode(train)), args,
                     evaluate=evaluate, data_collator=DataCollatorWithPadding(tokenizer))


def run(cfg: RunConfig, storage: Storage, stage: str = "difficulty_scorer", force: bool = False,
        fault: Optional[dict] = None, echo=print, depends_on: str = "") -> dict:
    tcfg = cfg.stages.difficulty_scorer
    if tcfg.input:
        data_uri, upstream = tcfg.input, "input:" + tcfg.input
        read_input(data_uri, cfg.storage.endpoint_url, required_column=["query_id", "query", "fail_rate"])
    else:
        labels = storage.manifest("difficulty_labels")
        if labels is None:
            raise InputError("the difficulty_labels stage has not finished in this run root; run it first or set "
                             "stages.difficulty_scorer.input")
        if labels["rows"] == 0:
            raise InputError(f"the difficulty_labels stage kept no rows ({labels['excluded_by_reason']}); nothing to train on")
        data_uri, upstream = storage.uri("difficulty_labels", "data"), f"difficulty_labels:{labels['config_hash']}:{labels['finished_at']}"
    loop_config = {**tcfg.model_dump(mode="json"), "accumulation": tcfg.accumulation,
                   "model_path": cfg.models[tcfg.model].path, "data_uri": data_uri, "fault": fault}
    upstream = "|".join(filter(None, [upstream, depends_on]))
    return run_training(cfg, storage, "difficulty_scorer", train_loop, loop_config, upstream, force=force, echo=echo)
