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
from .common import FaultInjection, deepspeed_config, export_model, local_model, resume_dir, run_training, write_metrics


def qft_rows(tokenizer, questions: list[str]) -> list[dict]:
    """Prompt/completion rows for SFT from the tokenizer's own chat template."""
    turn = turn_template(tokenizer)
    return [{"prompt": turn.prefix, "completion": q.strip() + turn.end_of_turn} for q in questions if q and q.strip()]


def read_questions(uri: str, endpoint: Optional[str], limit: Optional[int]) -> list[str]:
    """The `query` column of a (small) seed dataset; read on each worker straight from storage."""
    import pyarrow.dataset as pads

    from ..storage import resolve

    fs, path = resolve(uri, endpoint)
    fmt = "json" if path.endswith((".jsonl", ".json")) else "parquet"
    table = pads.dataset(path, filesystem=fs, format=fmt).to_table(columns=["query"])
    questions = table.column("query").to_pylist()
    return questions[:limit] if limit else questions


def sft_args(c: dict, output_dir: str):
    from trl import SFTConfig

    on_gpu = c["gpus_per_worker"] > 0
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=c["per_device_batch_size"],
        gradient_accumulation_steps=c["accumulation"],
        learning_rate=c["learning_rate"],
        num_train_epochs=c["epochs"],
        lr_scheduler_type=c["lr_scheduler"],
        warmup_steps=c["warmup_ratio"],  # transformers 5: a float in [0, 1) is a ratio of total steps
        max_length=c["max_length"],
        bf16=c["precision"] == "bf16",
        fp16=c["precision"] == "fp16",
        use_cpu=not on_gpu,
        deepspeed=deepspeed_config(c["deepspeed"]),
        gradient_checkpointing=c["gradient_checkpointing"],
        save_strategy="steps",
        save_steps=c["save_steps"],
        save_total_limit=c["keep_checkpoints"],
        logging_steps=1,
        report_to=[],
        seed=c["seed"],
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def train_loop(c: dict) -> None:
    """Runs on every Ray Train worker."""
    import tempfile

    import datasets
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    on_gpu = c["gpus_per_worker"] > 0
    if not on_gpu:
        torch.set_num_threads(max(1, int(c["cpus_per_worker"])))
    if c["deepspeed"] != "none":
        import deepspeed

        # Before TrainingArguments: otherwise ZeRO-3 computes the batch size for world size 1.
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

    model_path = local_model(c["model_path"], c["endpoint"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = qft_rows(tokenizer, read_questions(c["data_uri"], c["endpoint"], c["max_examples"]))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c["precision"], torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)

    start = {}

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            start["step"] = state.global_step  # > 0 when resumed from a checkpoint

    callbacks = [RayTrainReportCallback(), Progress()]
    if c.get("fault"):
        callbacks.append(FaultInjection(**c["fault"]).callback())
    trainer = SFTTrainer(
        model=model,
        args=sft_args(c, tempfile.mkdtemp(prefix="qft-")),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer = prepare_trainer(trainer)
    trainer.train(resume_from_checkpoint=resume_dir())
    export_model(trainer, tokenizer, c["export_uri"], c["endpoint"])

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if ray.train.get_context().get_world_rank() == 0:
        write_metrics(c, {
            "steps": trainer.state.global_step,
            "start_step": start.get("step", 0),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "losses": losses,
            "examples": len(rows),
        })


def run(cfg: RunConfig, storage: Storage, force: bool = False, fault: Optional[dict] = None, echo=print) -> dict:
    """The `qft` stage: seed problems -> fine-tuned question generator (HF checkpoint)."""
    tcfg = cfg.stages.qft
    model = cfg.models[tcfg.model]
    if tcfg.input:
        data_uri, upstream = tcfg.input, "input:" + tcfg.input
        read_input(data_uri, cfg.storage.endpoint_url, required_column="query")
    else:
        seeds = storage.manifest("seed_problems")
        if seeds is None:
            from ..storage import InputError

            raise InputError("the seed_problems stage has not finished in this run root; run it first or set stages.qft.input")
        data_uri, upstream = storage.uri("seed_problems", "data"), "seed_problems:" + seeds["config_hash"]
    loop_config = {**tcfg.model_dump(mode="json"), "accumulation": tcfg.accumulation, "model_path": model.path,
                   "data_uri": data_uri, "fault": fault}
    return run_training(cfg, storage, "qft", train_loop, loop_config, upstream, force=force, echo=echo)
