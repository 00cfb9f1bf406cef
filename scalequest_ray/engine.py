"""vLLM replica pools on Ray Data, built from a ModelConfig through `ray.data.llm`."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Optional

import pyarrow as pa

from .config import ModelConfig, RunConfig
from .columns import REASON, TOKENS
from .storage import endpoint_url
from .text import finish_reason


def configure_data_context() -> None:
    """Ray Data settings every stage runs with (the driver's context travels with each dataset).

    Both replace Ray 2.60 defaults whose fixed cost dominated small and medium stages (measured
    on 2 cores, 32 rows, one execution; benchmarks/stage_overhead.py):
    - the V2 Parquet reader lists files in a task that starts a nested footer-reading task, and
      on a busy or cold worker pool that costs 5-8 s per read (V1: 0.4-1.5 s). V1 is also what
      Ray Data's checkpoint filter and our reads were tested with.
    - the hash shuffle (groupby, join) starts its aggregator actors for every execution: 9-14 s
      per groupby. The pull-based sort shuffle is plain tasks: about 1 s, no CPUs held by actors
      (which is also what lets a shuffle run on 1-CPU nodes), and it scales to our sizes once its
      input is coalesced to the partition count (shuffle.groupby says why)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    quiet_console()


def quiet_console() -> None:
    """When stdout is not a terminal (CI, `ray job logs`, a file), Ray Data's progress bars turn
    into multi-line dumps every few seconds and its INFO lines into dozens per stage: the runner
    prints one progress line per stage instead (console.StageProgress), and Ray Data's console
    keeps its warnings (its log file, ray-data.log in the session folder, keeps everything)."""
    import logging
    import sys

    from ray.data import DataContext

    if sys.stdout.isatty():
        return
    DataContext.get_current().enable_progress_bars = False
    from ray.data._internal.logging import configure_logging

    configure_logging()
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler) is logging.StreamHandler or getattr(handler, "name", "") == "console":
            handler.setLevel(logging.WARNING)


def init_ray(cfg: RunConfig) -> None:
    """Join the configured cluster (or RAY_ADDRESS, as under `ray job submit`), else start one.

    Workers' output (vLLM's engine logs, Ray Train's and transformers' prints, an engine's
    teardown) stays in Ray's session logs unless `ray.worker_logs` is set: a failing task still
    raises in this driver with its traceback, and each stage prints what it did."""
    import ray

    configure_data_context()
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=cfg.ray.worker_logs)
    else:
        # address="local": a new local Ray even when another one runs on this machine (a bare
        # ray.init() would join that one, and refuse num_cpus).
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1)),
                 include_dashboard=False, log_to_driver=cfg.ray.worker_logs)


def native_bf16(cpu_flags: set[str]) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags computes bfloat16 matmuls natively."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def engine_dtype(model: ModelConfig, flags: Optional[set[str]] = None) -> str:
    """The dtype a replica's engine runs in: the config's, or for "auto" vLLM's own choice on
    GPU, and on CPU bfloat16 only where the CPU has native bf16 (else float32, several times
    faster there). CPU flags are read on the driver: the demo's replicas run on this machine;
    a cluster of CPU nodes of another kind sets dtype explicitly."""
    dtype = model.engine.dtype
    if dtype != "auto" or model.scale.gpus_per_replica > 0:
        return dtype
    return "bfloat16" if native_bf16(cpu_flags() if flags is None else flags) else "float32"


def engine_kwargs(model: ModelConfig, task_type: str = "generate") -> dict:
    e, s = model.engine, model.scale
    kwargs = dict(
        dtype=engine_dtype(model),
        max_model_len=e.max_model_len,
        enforce_eager=e.enforce_eager,
        max_num_seqs=e.max_num_seqs,
        enable_chunked_prefill=e.enable_chunked_prefill,
        enable_prefix_caching=e.enable_prefix_caching,
        trust_remote_code=e.trust_remote_code,
        tensor_parallel_size=s.tensor_parallel_size,
    )
    if not e.enable_chunked_prefill:
        # Without chunking, one step must fit the longest prompt; allow a full batch of them.
        kwargs["max_num_batched_tokens"] = max(e.max_model_len, 16384)
    if task_type != "generate":
        # A classifier reads each prompt once: no KV cache reuse to gain. Nothing is sampled, so the
        # CPU seed bug of chunked prefill does not apply, and on CPU small prefill chunks are faster:
        # a bare vLLM classify of SmolLM2 + head over ~250-token rows, 2 threads, scored 1.76 rows/s
        # with 512-token steps, 1.66 with 1024, 1.29 with 16384 (HF fp32 batch 1: 1.27).
        kwargs["enable_prefix_caching"] = False
        kwargs["enable_chunked_prefill"] = True
        kwargs.pop("max_num_batched_tokens", None)
        if s.gpus_per_replica == 0:
            kwargs["max_num_batched_tokens"] = 512
    if s.gpus_per_replica > 0:
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    kwargs.update(e.extra)
    return kwargs


def cpu_engine_env(model: ModelConfig) -> dict:
    """Environment of a CPU replica's engine.

    vLLM picks its multiprocessing executor on CPU, so every engine start spawned a model-runner
    process that imports vLLM and torch again (~15 s on 2 cores; benchmarks/engine_start.py);
    the engine core is already a process of its own (AsyncLLM spawns it). With
    VLLM_ENABLE_V1_MULTIPROCESSING=0 vLLM keeps the uniprocess executor and the model runs
    inside the engine core: the tiny model's questions stage went from 90 s to 62 s, and the
    demo's SmolLM2 questions stage generated no slower (16.8 tok/s, against 14.8 with the
    multiprocessing executor, one run each). Its compute threads are then torch's, so
    OMP_NUM_THREADS keeps a replica within the CPUs it holds in Ray (the multiprocessing
    executor's own thread binding gave it one core here as well)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(model.engine.cpu_kv_cache_gib),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "OMP_NUM_THREADS": str(max(1, int(model.scale.cpus_per_replica)))}


def build_llm(model: ModelConfig, preprocess: Callable, postprocess: Callable, s3_endpoint: Optional[str] = None,
              task_type: str = "generate"):
    """A Ray Data LLM processor: preprocess -> vLLM actor pool -> postprocess. `task_type`
    "classify" serves a sequence-classification model with vLLM's pooling runner (scoring).

    We render prompts ourselves (pure string work on the chat template, see text.turn_template),
    so Ray Data LLM's chat-template, tokenize and detokenize actor pools are switched off:
    vLLM tokenizes and detokenizes inside the engine, and each extra pool would hold CPUs.
    Failing rows (e.g. a prompt longer than the context) come back with `__inference_error__`
    set instead of killing the stage.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from ray.llm._internal.common.utils import download_utils

    s = model.scale
    on_gpu = s.gpus_per_replica > 0
    if on_gpu and s.tensor_parallel_size > 1:
        placement = {"bundle_per_worker": {"CPU": max(s.cpus_per_replica / s.tensor_parallel_size, 1), "GPU": 1,
                                           **s.resources}}
    else:
        bundle = {"CPU": s.cpus_per_replica, **s.resources}
        if on_gpu:
            bundle["GPU"] = s.gpus_per_replica
        placement = {"bundles": [bundle]}
    env = {} if on_gpu else cpu_engine_env(model)
    endpoint = endpoint_url(s3_endpoint)
    if model.path.startswith("s3://") and endpoint:
        # Ray Data LLM downloads s3:// models itself (tokenizer files on the driver, weights on
        # each replica's node) and reads a custom endpoint only from this variable.
        env["AWS_ENDPOINT_URL_S3"] = endpoint
        os.environ.setdefault("AWS_ENDPOINT_URL_S3", endpoint)
    config = vLLMEngineProcessorConfig(
        model_source=model.path,
        engine_kwargs=engine_kwargs(model, task_type),
        task_type=task_type,
        runtime_env={"env_vars": env} if env else None,
        batch_size=s.batch_size,
        concurrency=tuple(s.replicas),
        accelerator_type=s.accelerator_type,
        placement_group_config=placement,
        # The engine metrics exporter needs ray[serve]'s Prometheus bits, which we do not ship.
        log_engine_metrics=False,
        should_continue_on_error=True,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    # Ray Data LLM's processor builder calls ray.init(ignore_reinit_error=True) and resolves the
    # model path, which log three INFO lines on the driver before every engine stage
    # ("Connecting to existing Ray cluster", "Calling ray.init() again", "No cloud storage mirror
    # configured"): nothing a user acts on. Their warnings and errors still print.
    with _quiet_loggers(logging.getLogger("ray._private.worker"), download_utils.logger):
        processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)

    def run(ds):
        # Ray Data hands the engine pool one task per input block and cuts it into batches inside
        # the task, whose rows come out only when the whole block is done. A 12,500-row block (one
        # request file) then sat on a replica for the whole stage, next to every other block (each
        # replica takes up to 2 x max_concurrent_batches tasks at once), so nothing reached the
        # write, and nothing was committed for a resume, until the stage's last seconds. Blocks of
        # one batch finish in the order they were sent: rows stream to the write as they are made.
        return processor(ds.repartition(target_num_rows_per_block=s.batch_size))

    return run


@contextlib.contextmanager
def _quiet_loggers(*loggers: logging.Logger):
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# Provenance columns every generation stage writes, after its own columns.
GENERATION_FIELDS = [
    ("seed", pa.int64()),
    ("sampling", pa.string()),
    ("finish_reason", pa.string()),
    ("num_input_tokens", pa.int64()),
    (TOKENS, pa.int64()),
    (REASON, pa.string()),
    ("error", pa.string()),
]


def engine_result(row: dict, max_tokens: int, max_model_len: int, stop_ids: list) -> dict:
    """The fields every stage reads from one engine output row (success or error row)."""
    error = row.get("__inference_error__") or None
    tokens = row.get("generated_tokens")
    tokens = list(tokens) if tokens is not None else []
    n_in, n_out = int(row.get("num_input_tokens") or 0), int(row.get("num_generated_tokens") or 0)
    return {
        "error": error,
        "text": None if error else (row.get("generated_text") or ""),
        "num_input_tokens": n_in,
        "num_output_tokens": n_out,
        "finish_reason": None if error else finish_reason(
            n_out, min(max_tokens, max_model_len - n_in), tokens[-1] if tokens else None, stop_ids),
    }


def keep_all(row: dict) -> dict:
    """Postprocess that keeps every column, so success rows have the same schema as error rows
    (Ray Data LLM returns error rows whole and skips postprocess for them)."""
    return dict(row)



def chat_sampling(model: ModelConfig, sampling_cfg, s3_endpoint: Optional[str] = None):
    """(turn template, stop token ids, vLLM sampling dict) for prompting `model` through its own
    chat template: generation stops at the template's end-of-turn."""
    from .models import load_tokenizer
    from .text import stop_criteria, turn_template

    tokenizer = load_tokenizer(model.path, s3_endpoint)
    turn = turn_template(tokenizer)
    stops, stop_strings = stop_criteria(tokenizer, turn.end_of_turn)
    sampling = {"temperature": sampling_cfg.temperature, "top_p": sampling_cfg.top_p,
                "max_tokens": sampling_cfg.max_tokens, "stop_token_ids": stops, "stop": stop_strings}
    return turn, stops, sampling
