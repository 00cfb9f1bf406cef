"""QPO pair building: tiny generator -> optimizer (vLLM pool, or an OpenAI-compatible HTTP server
started here on 127.0.0.1 that answers with fixed rewrites and injects a 429 and a 500)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scalequest_ray import pipeline
from scalequest_ray.config import load_config

pytestmark = pytest.mark.integration
API_KEY = "sk-test-qpo-key-never-logged-91c2"


def _read(folder: Path) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def _config(tmp_path, tiny_model, optimizer: dict) -> Path:
    engine = {"max_model_len": 1024, "enforce_eager": True, "cpu_kv_cache_gib": 1}
    raw = {
        "name": "qpo", "root": str(tmp_path / "root"), "seed": 11,
        "models": {"tiny": {"path": str(tiny_model), "engine": engine, "scale": {"batch_size": 8}}},
        "stages": {"qpo_pairs": {"generator": "tiny", "num_questions": 16, "min_chars": 1,
                                 "sampling": {"max_tokens": 24},
                                 "optimizer_sampling": {"temperature": 0.0, "max_tokens": 32}, **optimizer}},
        "pipeline": ["qpo_pairs"],
    }
    path = tmp_path / "qpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions. Request 1 -> 429, request 2 -> 500, then fixed rewrites; every
    third question gets a reply without the marker, to exercise that reason."""

    calls: list = []
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            FakeOpenAI.calls.append({"auth": self.headers.get("Authorization"), "path": self.path})
            n = len(FakeOpenAI.calls)
        if n == 1:
            return self._send(429, {"error": {"message": "rate limited"}})
        if n == 2:
            return self._send(500, {"error": {"message": "internal error"}})
        prompt = body["messages"][0]["content"]
        original = prompt.split("Problem:\n", 1)[1].split("\n\n", 1)[0]
        if sum(map(ord, original)) % 3 == 0:
            content = "I could not improve it."
        else:
            content = f"It needs a number.\nFinal question: {original} Give the answer as a number."
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_openai():
    FakeOpenAI.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _assert_pairs_from_the_http_optimizer(out: Path, result, total: int, capfd) -> None:
    """The pairs of a qpo_pairs stage whose optimizer is FakeOpenAI: the 429 and the 500 were
    retried, the key went in the Authorization header only, every reply is a pair or a reason."""
    pairs, excluded = _read(out / "data"), _read(out / "exclusions")
    assert len(pairs) + len(excluded) == total
    asked = excluded[~excluded.exclude_reason.str.startswith("question_")]
    # every kept question was sent (the 429 and the 500 were retried, not lost)
    assert len(FakeOpenAI.calls) == len(pairs) + len(asked) + 2
    assert {c["auth"] for c in FakeOpenAI.calls} == {f"Bearer {API_KEY}"}
    assert len(pairs) > 0 and set(asked.exclude_reason) <= {"missing_marker", "identical", "empty_rewrite"}
    assert (pairs.chosen == pairs.rejected + " Give the answer as a number.").all()
    assert set(pairs.direction) <= {"solvability", "difficulty"}
    assert (pairs.completion_tokens > 0).all() and (pairs.prompt_tokens > 0).all()
    assert pairs.prompt.str.endswith("<|im_start|>user\n").all()
    assert sum(result.manifest["excluded_by_reason"].values()) == len(excluded)
    # the key is in no output and no log line
    logs = "".join(capfd.readouterr())
    assert API_KEY not in logs
    # and Ray Data LLM's set-up lines before each engine stage stay off the console
    assert "[qpo_pairs@a] done:" in logs
    assert "Calling ray.init() again" not in logs and "No cloud storage mirror configured" not in logs
    for f in out.rglob("*"):
        if f.is_file():
            assert API_KEY.encode() not in f.read_bytes()


def test_missing_api_key_is_a_clear_error(tiny_model, ray_cluster, tmp_path, monkeypatch):
    from scalequest_ray.storage import InputError

    monkeypatch.delenv("SQ_TEST_ABSENT_KEY", raising=False)
    cfg = load_config(_config(tmp_path, tiny_model, {"optimizer_http": {
        "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "SQ_TEST_ABSENT_KEY"}}))
    with pytest.raises(InputError, match="environment variable SQ_TEST_ABSENT_KEY is not set"):
        pipeline.run(cfg)


def test_full_chain_seeds_qft_pairs_qpo_generation(tiny_model, ray_cluster, tmp_path, fake_openai, monkeypatch, capfd):
    """seed problems -> QFT (DeepSpeed ZeRO-3 over gloo, the GPU config's setting, on CPU workers:
    the sharded weights are gathered for the export) -> QPO pairs from the QFT model through vLLM
    and an OpenAI-compatible HTTP optimizer (FakeOpenAI: a 429 and a 500 to retry), and a second
    pair stage whose optimizer is a vLLM pool -> DPO -> questions from the QPO model. The
    per-generator stages are named instances (qft@a, qpo_pairs@a, qpo_pairs@vllm, qpo@a), as in
    configs/paper_gpu.yaml: each its own folder, manifest and fingerprint. A rerun skips every stage."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SQ_TEST_OPTIMIZER_KEY", API_KEY)
    engine = {"max_model_len": 1024, "enforce_eager": True, "cpu_kv_cache_gib": 1}
    train = {"model": "tiny", "workers": 2, "per_device_batch_size": 2, "save_steps": 100, "max_length": 128}
    raw = {
        "name": "chain", "root": str(tmp_path / "root"), "seed": 5,
        "models": {
            "tiny": {"path": str(tiny_model), "engine": engine, "scale": {"batch_size": 8}},
            "qft": {"path": "stage:qft@a", "engine": engine, "scale": {"batch_size": 8}},
            "qpo": {"path": "stage:qpo@a", "engine": engine, "scale": {"batch_size": 8}},
        },
        "stages": {
            "seed_problems": {},
            # One checkpoint (the last step): ZeRO-3's save goes through Ray Train's report once.
            # A gentle lr: at 1e-3 the tiny model unlearns ending its questions (p(<|im_end|>)
            # fell from 0.027 to 0.0008) and every QPO question is cut at max_tokens.
            "qft@a": {**train, "deepspeed": "zero3", "batch_size": 8, "max_examples": 32, "learning_rate": 1e-4,
                    "save_steps": 4},
            "qpo_pairs@a": {"generator": "qft", "num_questions": 24, "min_chars": 1, "sampling": {"max_tokens": 64},
                          "optimizer_sampling": {"temperature": 0.0, "max_tokens": 32},
                          "optimizer_http": {"base_url": fake_openai, "model": "fake-4o-mini", "api_key_env": "SQ_TEST_OPTIMIZER_KEY",
                                             "qps": 50, "max_retries": 3, "retry_wait_s": 0.05}},
            # The same QFT model's questions rewritten by a vLLM pool (a random model: no marker).
            "qpo_pairs@vllm": {"generator": "qft", "num_questions": 16, "min_chars": 1, "sampling": {"max_tokens": 64},
                               "optimizer_sampling": {"temperature": 0.0, "max_tokens": 32}, "optimizer_model": "tiny"},
            "qpo@a": {**train, "model": "qft", "batch_size": 4, "epochs": 3, "learning_rate": 5e-4, "beta": 0.1},
            "questions": {"generators": [{"name": "qpo", "model": "qpo", "num_questions": 8}],
                          "sampling": {"max_tokens": 16}, "min_chars": 1},
        },
        "pipeline": ["seed_problems", "qft@a", "qpo_pairs@a", "qpo_pairs@vllm", "qpo@a", "questions"],
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(raw))
    results = pipeline.run(load_config(path))
    root = Path(raw["root"])

    # QFT under ZeRO-3: trained, exported as a plain HF checkpoint that reloads and generates.
    qft = results[1]
    m = qft["metrics"]
    assert m["steps"] == 4 and m["start_step"] == 0 and m["examples"] == 32
    assert m["final_loss"] < m["first_loss"]
    export = root / "qft@a" / "model"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    assert qft["model"] == str(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    out = model.generate(**tok("<|im_start|>user\n", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 3
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)
    # ... and vLLM generated the pairs' questions from it (model path stage:qft@a).
    pairs = results[2]
    assert "qft@a:" in pairs.manifest["upstream"] and pairs.manifest["stage"] == "qpo_pairs@a"
    _assert_pairs_from_the_http_optimizer(root / "qpo_pairs@a", pairs, 24, capfd)
    # The second pair stage: its own folder and ids; its vLLM optimizer (a random model) never
    # writes the marker, so every asked question is excluded with that reason.
    out = root / "qpo_pairs@vllm"
    kept, excluded = _read(out / "data"), _read(out / "exclusions")
    assert len(kept) + len(excluded) == 16 and results[3].manifest["stage"] == "qpo_pairs@vllm"
    asked = excluded[~excluded.exclude_reason.str.startswith("question_")]
    assert len(asked) > 0 and set(asked.exclude_reason) <= {"missing_marker", "empty_output"}
    assert (asked.optimizer == str(tiny_model)).all() and asked.optimizer_output.notna().any()
    assert excluded.query_id.str.startswith("qpo@vllm-").all()
    assert not set(excluded.query_id) & set(_read(root / "qpo_pairs@a" / "exclusions").get("query_id", []))

    qpo = json.loads((root / "qpo@a" / "_manifest.json").read_text())
    m = qpo["metrics"]
    assert m["steps"] >= 3 and m["final_loss"] < m["first_loss"]
    assert m["rewards/margins"][-1] > m["rewards/margins"][0]
    assert qpo["upstream"].startswith("qpo_pairs@a:") and "qft@a:" in qpo["upstream"]  # its own pairs
    assert (root / "qpo@a" / "model" / "model.safetensors").exists()
    assert qpo["resources"]["pools"]["RayTrainWorker"]["replicas"]["max"] == 2  # the ledger: 2 workers
    q = results[-1].manifest
    assert q["rows"] + q["excluded_rows"] == 8 and "qpo@a:" in q["upstream"]
    assert json.loads((root / "questions" / "_manifest.json").read_text())["rows"] == q["rows"]

    # Everything finished: a rerun skips all six stages (the trained ones by their manifests).
    calls = len(FakeOpenAI.calls)
    again = pipeline.run(load_config(path))
    assert again[1]["finished_at"] == qft["finished_at"] and again[4]["finished_at"] == qpo["finished_at"]
    assert again[0].skipped and again[2].skipped and again[3].skipped and again[5].skipped
    assert len(FakeOpenAI.calls) == calls
