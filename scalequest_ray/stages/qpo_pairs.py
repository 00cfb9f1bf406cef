"""QPO preference pairs (ScaleQuest stage 2's data).

The QFT model writes questions; an optimizer model rewrites each one in ONE direction drawn from
a seeded per-row RNG: solvability (make it a self-contained, sensible problem with one numeric
answer) or difficulty (harder, 10-20 more words). The reply must end with a fixed marker line;
the text after it is the rewrite. Pairs: prompt = the generator's user-turn prefix, chosen =
rewrite, rejected = original. Missing markers, empty rewrites and rewrites identical to the
original go to exclusions with their reason, as do the questions that were empty or truncated.

Optimizer backends: (a) any HF model on our vLLM replica pools, greedy; (b) any
OpenAI-compatible endpoint through Ray Data LLM's HTTP processor, with a QPS limit, retries with
exponential backoff (429/408/5xx), the API key read from an environment variable on the driver
(never written to config, outputs or logs) and token usage recorded per row.
"""

from __future__ import annotations

import asyncio
import json
import os

import pandas as pd
import pyarrow as pa

from ..config import RunConfig, instance_suffix
from ..engine import build_llm, chat_sampling, engine_result, keep_all
from ..generation import generate_questions
from ..prompts import OPTIMIZER_PROMPTS, REWRITE_MARKER
from ..columns import REASON, TOKENS
from ..stage import Stage, StageInput
from ..storage import InputError, Storage
from ..text import choose_direction, parse_rewrite

SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("direction", pa.string()),
    ("generator_model", pa.string()),
    ("optimizer", pa.string()),
    ("optimizer_output", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    (TOKENS, pa.int64()),
    (REASON, pa.string()),
    ("error", pa.string()),
])


def _with_direction(batch: pd.DataFrame, run_seed: int) -> pd.DataFrame:
    kept = batch[batch[REASON].isna()]
    return pd.DataFrame({
        "query_id": kept["query_id"], "query": kept["query"], "generator_model": kept["generator_model"],
        "direction": [choose_direction(run_seed, q) for q in kept["query_id"]],
    })


def _failed_questions(batch: pd.DataFrame, prefix: str) -> pa.Table:
    bad = batch[batch[REASON].notna()]
    rows = [{"query_id": r["query_id"], "prompt": prefix, "rejected": r["query"], "generator_model": r["generator_model"],
             TOKENS: int(r[TOKENS]), REASON: "question_" + r[REASON], "error": r["error"]} for r in bad.to_dict("records")]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _pair(r: dict, prefix: str, optimizer: str, output, error, usage: dict) -> dict:
    chosen, reason = (None, "optimizer_error") if error else parse_rewrite(output, r["query"], REWRITE_MARKER)
    return {
        "query_id": r["query_id"], "prompt": prefix, "chosen": chosen, "rejected": r["query"],
        "direction": r["direction"], "generator_model": r["generator_model"], "optimizer": optimizer,
        "optimizer_output": output, "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"), TOKENS: int(usage.get("completion_tokens") or 0),
        REASON: reason, "error": error,
    }


# --- backend (a): a vLLM replica pool -------------------------------------------------------

class _OptimizerPrompt:
    def __init__(self, wrap_prefix: str, wrap_suffix: str, sampling: dict):
        self.prefix, self.suffix, self.sampling = wrap_prefix, wrap_suffix, sampling

    def __call__(self, row: dict) -> dict:
        text = OPTIMIZER_PROMPTS[row["direction"]].format(query=row["query"])
        return {"prompt": self.prefix + text + self.suffix, "sampling_params": dict(self.sampling)}


def _finish_vllm(batch: pd.DataFrame, prefix: str, optimizer: str, sampling: dict, stop_ids: list,
                 max_model_len: int) -> pa.Table:
    rows = []
    for r in batch.to_dict("records"):
        out = engine_result(r, sampling["max_tokens"], max_model_len, stop_ids)
        usage = {"prompt_tokens": out["num_input_tokens"], "completion_tokens": out["num_output_tokens"]}
        rows.append(_pair(r, prefix, optimizer, out["text"], out["error"], usage))
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _vllm_rewrites(cfg: RunConfig, pcfg, questions, prefix: str):
    model = cfg.models[pcfg.optimizer_model]
    turn, stops, sampling = chat_sampling(model, pcfg.optimizer_sampling, cfg.storage.endpoint_url)
    processor = build_llm(model, _OptimizerPrompt(turn.prefix, turn.suffix, sampling), keep_all, cfg.storage.endpoint_url)
    return processor(questions).map_batches(
        _finish_vllm, batch_format="pandas",
        fn_kwargs=dict(prefix=prefix, optimizer=model.path, sampling=sampling, stop_ids=stops,
                       max_model_len=model.engine.max_model_len))


# --- backend (b): an OpenAI-compatible HTTP endpoint ----------------------------------------

class RetryingSession:
    """aiohttp session factory whose middleware also retries 5xx replies with backoff.

    Ray Data LLM's HTTP stage retries 429/408/502/503/504 and connection errors itself, but takes
    a 500's error body for an answer; this middleware retries those before they reach it.
    """

    def __init__(self, max_retries: int, wait_s: float):
        self.max_retries, self.wait_s = max_retries, wait_s

    def __call__(self):
        import aiohttp

        max_retries, wait_s = self.max_retries, self.wait_s

        async def retry_5xx(request, handler):
            for attempt in range(max_retries + 1):
                response = await handler(request)
                if response.status < 500 or response.status in (502, 503, 504) or attempt == max_retries:
                    return response
                response.release()
                await asyncio.sleep(wait_s * 2**attempt)
            return response

        return aiohttp.ClientSession(middlewares=(retry_5xx,))


class _Payload:
    def __init__(self, model: str, sampling: dict):
        self.model, self.sampling = model, sampling

    def __call__(self, row: dict) -> dict:
        text = OPTIMIZER_PROMPTS[row["direction"]].format(query=row["query"])
        return {"payload": {"model": self.model, "messages": [{"role": "user", "content": text}], **self.sampling}}


def _finish_http(batch: pd.DataFrame, prefix: str, optimizer: str) -> pa.Table:
    rows = []
    for r in batch.to_dict("records"):
        resp = r.get("http_response") or {}
        if isinstance(resp, str):
            resp = json.loads(resp)
        choices = resp.get("choices") or []
        error = None if choices else f"no choices in response: {str(resp.get('error', resp))[:200]}"
        output = choices[0].get("message", {}).get("content") if choices else None
        rows.append(_pair(r, prefix, optimizer, output, error, resp.get("usage") or {}))
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _api_key(stage: str, pcfg) -> str:
    h = pcfg.optimizer_http
    key = os.environ.get(h.api_key_env)
    if not key:
        raise InputError(f"stages.{stage}.optimizer_http: environment variable {h.api_key_env} is not set")
    return key


def _http_rewrites(stage: str, pcfg, questions, prefix: str):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    h = pcfg.optimizer_http
    key = _api_key(stage, pcfg)
    s = pcfg.optimizer_sampling
    config = HttpRequestProcessorConfig(
        url=h.base_url.rstrip("/") + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        qps=h.qps, max_retries=h.max_retries, base_retry_wait_time_in_s=h.retry_wait_s,
        concurrency=h.concurrency, batch_size=h.batch_size,
        session_factory=RetryingSession(h.max_retries, h.retry_wait_s),
    )
    payload = _Payload(h.model, {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens})
    processor = build_processor(config, preprocess=payload, postprocess=keep_all)
    return processor(questions).map_batches(_finish_http, batch_format="pandas",
                                            fn_kwargs=dict(prefix=prefix, optimizer=f"{h.base_url}:{h.model}"))


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    stage = given.stage or "qpo_pairs"  # or a named instance, qpo_pairs@<generator>
    pcfg = cfg.section(stage)
    if pcfg.optimizer_http:
        _api_key(stage, pcfg)  # fail before any engine starts
    # Ids and seeds are tagged per instance: two generators' pair stages draw different seeds.
    generated, prefix = generate_questions(cfg, "qpo" + instance_suffix(stage), cfg.models[pcfg.generator], pcfg.num_questions,
                                           pcfg.sampling, pcfg.min_chars, tag="qpo")
    # The generated questions are written once and read twice (kept -> optimizer, failed ->
    # exclusions) instead of running the generator twice.
    generated = generated.materialize()
    questions = generated.map_batches(_with_direction, batch_format="pandas", fn_kwargs={"run_seed": cfg.seed})
    rewrites = _http_rewrites(stage, pcfg, questions, prefix) if pcfg.optimizer_http else \
        _vllm_rewrites(cfg, pcfg, questions, prefix)
    failed = generated.map_batches(_failed_questions, batch_format="pandas", fn_kwargs={"prefix": prefix})
    return rewrites.union(failed)


STAGE = Stage("qpo_pairs", build, runs_on="engine", unit="pairs")
