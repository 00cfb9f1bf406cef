"""What every training recipe shares: DeepSpeed configs, model fetch, resume, export, the Ray
Train run around a recipe's loop, and the stage bookkeeping (skip / resume / manifest)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ..config import RunConfig, TrainConfig
from ..models import local_model
from ..runner import STARTED  # the same attempt marker as the data stages
from ..storage import InputError, Storage, resolve

EXPORT = "model"  # <root>/<stage>/model/: the exported HF checkpoint
RAY_DIR = "ray"   # <root>/<stage>/ray/: Ray Train's run folder (checkpoints, kept for resume)
METRICS = "_metrics.json"


def deepspeed_config(kind: str) -> Optional[dict]:
    """A DeepSpeed config for HF Trainer ("auto" values are filled from TrainingArguments)."""
    if kind == "none":
        return None
    zero: dict = {"stage": 2 if kind == "zero2" else 3, "overlap_comm": False, "contiguous_gradients": True}
    if zero["stage"] == 3:
        # Without this, ZeRO-3 saves shards only and there is no model.safetensors to export.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if kind == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu"}
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def scratch_dir(c: dict, stage: str) -> str:
    """This worker's local scratch folder for HF's own checkpoints (output_dir) and the resume copy.

    The name is fixed per run root, stage and rank, and emptied on entry, so what a killed earlier
    attempt left behind is removed by the next one; train_and_export removes it at the end.
    """
    import hashlib

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    key = hashlib.sha1(c["export_uri"].encode()).hexdigest()[:12]
    base = Path(tempfile.gettempdir()) / "scalequest-ray-train" / f"{stage}-{key}-rank{rank}"
    shutil.rmtree(base, ignore_errors=True)
    (base / "out").mkdir(parents=True)
    return str(base / "out")


def resume_dir(scratch: Path) -> Optional[str]:
    """The HF checkpoint inside Ray Train's latest checkpoint, copied under scratch (None = fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "checkpoint", scratch / "resume" / "checkpoint", dirs_exist_ok=True)
    return str(scratch / "resume" / "checkpoint")


def export_model(trainer, tokenizer, dest_uri: str, endpoint: Optional[str]) -> None:
    """Save the final model as an HF checkpoint (safetensors + tokenizer) to dest (local or S3).

    Every rank calls save_model (ZeRO-3 gathers the weights collectively); rank 0 uploads.
    """
    import pyarrow.fs as pafs
    import ray.train

    local = tempfile.mkdtemp(prefix="export-")
    trainer.save_model(local)
    if ray.train.get_context().get_world_rank() == 0:
        tokenizer.save_pretrained(local)
        for junk in ("training_args.bin",):
            Path(local, junk).unlink(missing_ok=True)
        fs, path = resolve(dest_uri, endpoint)
        if isinstance(fs, pafs.LocalFileSystem):
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(local, path)
        else:
            pafs.copy_files(local, path, destination_filesystem=fs)
    shutil.rmtree(local, ignore_errors=True)


def write_metrics(c: dict, metrics: dict) -> None:
    """Rank 0's final training metrics, next to the exported model (read by the driver)."""
    import json

    fs, path = resolve(c["metrics_uri"], c["endpoint"])
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(metrics).encode())


def read_columns(uri: str, endpoint: Optional[str], columns: list[str], limit: Optional[int]) -> dict:
    """Columns of a (small) training set, read on each worker straight from storage."""
    import pyarrow.dataset as pads

    fs, path = resolve(uri, endpoint)
    fmt = "json" if path.endswith((".jsonl", ".json")) else "parquet"
    table = pads.dataset(path, filesystem=fs, format=fmt).to_table(columns=columns)
    if limit:
        table = table.slice(0, limit)
    return table.to_pydict()


def skip_shm_comm_op():
    """On CPU, DeepSpeed's process group JIT-compiles its shared-memory all-reduce op first: about
    3 min of both cores on a 2-core machine, again for every new virtualenv path (the build file
    embeds it), so on every fresh clone. The op serves only `inference_all_reduce` (AutoTP
    inference); ZeRO-3 training reduces through the gloo group either way. DeepSpeed builds the op
    only when its cached compatibility table says so, and keeps that table as one dict so that
    edits to it hold (deepspeed/ops/__init__.py)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def worker_setup(c: dict, head: str = "causal"):
    """Per-worker set-up shared by the recipes: threads, DeepSpeed's process group, the model
    and its tokenizer. Returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_gpu = c["gpus_per_worker"] > 0
    if not on_gpu:
        torch.set_num_threads(max(1, int(c["cpus_per_worker"])))
    if c["deepspeed"] != "none":
        import deepspeed

        if not on_gpu:
            skip_shm_comm_op()
        # Before TrainingArguments: otherwise ZeRO-3 computes the batch size for world size 1.
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    model_path = local_model(c["model_path"], c["endpoint"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c["precision"], torch.float32)
    if head == "regression":
        from transformers import AutoModelForSequenceClassification

        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=dtype, num_labels=1, problem_type="regression")
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), tokenizer


def common_args(c: dict, output_dir: str) -> dict:
    """TrainingArguments fields every recipe sets the same way from a TrainConfig dict."""
    return dict(
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
        use_cpu=c["gpus_per_worker"] == 0,
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


def train_and_export(trainer_cls, c: dict, model, tokenizer, dataset, args, evaluate=None, **trainer_kwargs) -> None:
    """Build the TRL trainer with Ray's report callback, resume if Ray has a checkpoint, train,
    export the model and (rank 0) write the final metrics."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import TrainerCallback

    start = {}

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            start["step"] = state.global_step  # > 0 when resumed from a checkpoint

    callbacks = [RayTrainReportCallback(), Progress()]
    if c.get("fault"):
        callbacks.append(FaultInjection(**c["fault"]).callback())
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=callbacks, **trainer_kwargs)
    trainer = prepare_trainer(trainer)
    scratch = Path(args.output_dir).parent  # from scratch_dir()
    try:
        trainer.train(resume_from_checkpoint=resume_dir(scratch))
        export_model(trainer, tokenizer, c["export_uri"], c["endpoint"])
    finally:
        # HF writes its checkpoints to args.output_dir (Ray's report callback copies each one to
        # the run's storage) and the resume copy is local too: without this, every training run
        # left up to 1.6 GB per worker in /tmp.
        shutil.rmtree(scratch, ignore_errors=True)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    if ray.train.get_context().get_world_rank() == 0:
        extra = {k: [h[k] for h in history if k in h] for k in ("rewards/margins", "rewards/accuracies")}
        write_metrics(c, {
            "steps": trainer.state.global_step,
            "start_step": start.get("step", 0),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "losses": losses,
            "examples": len(dataset),
            **{k: v for k, v in extra.items() if v},
            **(evaluate(trainer) if evaluate else {}),
        })


class FaultInjection:
    """Test hook: raise once at a given step (a marker file makes the retry pass), or always."""

    def __init__(self, fail_at_step: int, marker: Optional[str] = None, always: bool = False):
        self.fail_at_step, self.marker, self.always = fail_at_step, marker, always

    def callback(self):
        from transformers import TrainerCallback

        hook = self

        class _Fail(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step != hook.fail_at_step:
                    return
                if hook.always or (hook.marker and not os.path.exists(hook.marker)):
                    if hook.marker:
                        Path(hook.marker).touch()
                    raise RuntimeError(f"injected failure at step {state.global_step}")

        return _Fail()


def check_resources(tcfg: TrainConfig, stage: str) -> None:
    """Fail before training when the cluster cannot place the workers at all. (One worker's bundle
    was checked against the nodes and the autoscaler by capacity.check; here, on a cluster of fixed
    size, the workers together.)"""
    import ray

    from ..capacity import has_autoscaler

    if has_autoscaler():
        return  # nodes come and go: what exists now is not the limit
    have = ray.cluster_resources()
    need_cpu = tcfg.workers * tcfg.cpus_per_worker
    need_gpu = tcfg.workers * tcfg.gpus_per_worker
    if need_gpu > have.get("GPU", 0):
        raise InputError(f"stages.{stage}: {tcfg.workers} workers x {tcfg.gpus_per_worker} GPU need {need_gpu:g} GPUs, "
                         f"the cluster has {have.get('GPU', 0):g}")
    if need_cpu > have.get("CPU", 0):
        raise InputError(f"stages.{stage}: {tcfg.workers} workers x {tcfg.cpus_per_worker:g} CPU need {need_cpu:g} CPUs, "
                         f"the cluster has {have.get('CPU', 0):g}")


def run_training(cfg: RunConfig, storage: Storage, stage: str, loop: Callable, loop_config: dict,
                 upstream: Optional[str], force: bool = False, echo=print) -> dict:
    """Skip / resume / fresh start, then a TorchTrainer around `loop`, then the manifest.

    A finished stage (manifest with the same config hash) is skipped. A stage that started with
    the same config but has no manifest (killed driver, failed run) resumes from Ray Train's last
    checkpoint under <root>/<stage>/ray/. Another config clears the stage and starts over.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    tcfg: TrainConfig = getattr(cfg.stages, stage)
    fingerprint = cfg.stage_fingerprint(stage, upstream)
    previous = storage.manifest(stage)
    if previous and previous.get("config_hash") == fingerprint and not force:
        echo(f"[{stage}] skipped (finished earlier, same config) -> {previous['model']}")
        return previous
    started_path = storage.path(stage, STARTED)
    started_before = storage.read_json(started_path) if storage.exists(started_path) else None
    # Resume only an unfinished attempt of this config; anything else in the folder is stale.
    if previous or force or not started_before or started_before.get("config_hash") != fingerprint:
        storage.delete_dir(storage.path(stage))
    resuming = bool(storage.exists(started_path))
    check_resources(tcfg, stage)
    storage.write_json(started_path, {"config_hash": fingerprint, "started_at": time.time()})

    on_gpu = tcfg.gpus_per_worker > 0
    resources = {"CPU": tcfg.cpus_per_worker, **tcfg.resources}
    if on_gpu:
        resources["GPU"] = tcfg.gpus_per_worker
    ray_storage = storage.path(stage, RAY_DIR)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "export_uri": storage.uri(stage, EXPORT),
                           "metrics_uri": storage.uri(stage, METRICS), "endpoint": cfg.storage.endpoint_url},
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.workers, use_gpu=on_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="run",
            storage_path=ray_storage,
            storage_filesystem=storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
        ),
    )
    t0 = time.time()
    trainer.fit()
    from ..ledger import stage_ledger

    held = stage_ledger(t0)
    metrics = storage.read_json(storage.path(stage, METRICS))
    manifest = {
        "stage": stage,
        "config_hash": fingerprint,
        "model": storage.uri(stage, EXPORT),
        "upstream": upstream,
        "resumed": resuming,
        "metrics": metrics,
        "seconds": round(time.time() - t0, 3),
        "finished_at": time.time(),
        "config": tcfg.model_dump(mode="json"),
        "resources": held,
    }
    storage.write_json(storage.path(stage, "_manifest.json"), manifest)
    # Like a data stage's: the attempt marker only matters until the manifest exists.
    if storage.exists(started_path):
        storage.fs.delete_file(started_path)
    echo(f"[{stage}] done: {metrics['steps']} steps (started at step {metrics['start_step']}), "
         f"loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f} in {manifest['seconds']:.1f} s -> {manifest['model']}")
    return manifest
