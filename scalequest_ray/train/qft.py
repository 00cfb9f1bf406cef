"""QFT (question fine-tuning, ScaleQuest stage 1): teach a problem-SOLVING model to WRITE problems.

Each training row is prompt = the model's chat template up to where the user's text starts,
completion = a seed question + the end-of-turn marker; TRL's SFTTrainer puts the loss on the
completion only. Runs as a Ray Train TorchTrainer (DDP or DeepSpeed ZeRO-2/3, CPU or GPU workers),
checkpoints to <root>/qft/ray/, resumes after failures, exports an HF checkpoint to <root>/qft/model/.
"""

from __future__ import annotations

from typing import Optional

from ..config import RunConfig
from ..storage import Storage, read_input
from ..text import turn_template
from .common import common_args, read_columns, run_training, scratch_dir, train_and_export, worker_setup


def qft_rows(tokenizer, questions: list[str]) -> list[dict]:
    """Prompt/completion rows for SFT from the tokenizer's own chat template."""
    turn = turn_template(tokenizer)
    return [{"prompt": turn.prefix, "completion": q.strip() + turn.end_of_turn} for q in questions if q and q.strip()]


def truncate_rows(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Cut each completion so prompt + completion fit in max_length tokens: what TRL's own
    truncation does, done here because TRL leaves max_length unenforced in padding-free mode."""
    out, prompt_tokens = [], {}  # every row shares the template's prompt: tokenize it once
    for r in rows:
        if r["prompt"] not in prompt_tokens:
            prompt_tokens[r["prompt"]] = len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        room = max_length - prompt_tokens[r["prompt"]]
        ids = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        out.append(r if len(ids) <= room else {**r, "completion": tokenizer.decode(ids[:max(room, 0)])})
    return out


def train_loop(c: dict) -> None:
    """Runs on every Ray Train worker."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = worker_setup(c)
    rows = qft_rows(tokenizer, read_columns(c["data_uri"], c["endpoint"], ["query"], c["max_examples"])["query"])
    args = common_args(c, scratch_dir(c, "qft"))
    if c.get("padding_free"):
        rows = truncate_rows(tokenizer, rows, c["max_length"])
        args = {**args, "max_length": None, "padding_free": True}
    args = SFTConfig(**args)
    train_and_export(SFTTrainer, c, model, tokenizer, datasets.Dataset.from_list(rows), args)


def run(cfg: RunConfig, storage: Storage, stage: str = "qft", force: bool = False, fault: Optional[dict] = None,
        echo=print, depends_on: str = "") -> dict:
    """The `qft` stage (or a named instance, qft@<generator>): seed problems -> fine-tuned question
    generator (HF checkpoint). `depends_on`: hashes of training stages whose exported model this
    one starts from."""
    tcfg = cfg.section(stage)
    model = cfg.models[tcfg.model]
    if tcfg.input:
        data_uri, upstream = tcfg.input, "input:" + tcfg.input
        read_input(data_uri, cfg.storage.endpoint_url, required_column="query")
    else:
        seeds = storage.manifest("seed_problems")
        if seeds is None:
            from ..storage import InputError

            raise InputError(f"the seed_problems stage has not finished in this run root; run it first or set stages.{stage}.input")
        data_uri, upstream = storage.uri("seed_problems", "data"), "seed_problems:" + seeds["config_hash"]
    loop_config = {**tcfg.model_dump(mode="json"), "accumulation": tcfg.accumulation, "model_path": model.path,
                   "data_uri": data_uri, "fault": fault}
    upstream = "|".join(filter(None, [upstream, depends_on]))
    return run_training(cfg, storage, stage, train_loop, loop_config, upstream, force=force, echo=echo)
