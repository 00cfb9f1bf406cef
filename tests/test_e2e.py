"""End to end: configs/demo.yaml with the real SmolLM2-135M-Instruct, small N."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scalequest_ray import pipeline
from scalequest_ray.config import load_config

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def test_demo_config_end_to_end(demo_model, ray_cluster, tmp_path):
    """The demo's method with the real SmolLM2, small N: seed problems -> QFT with the demo's Ray
    Train settings (its peak memory measured and printed for the record) -> questions from the QFT
    model -> responses."""
    import threading
    import time

    import psutil

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={tmp_path / 'demo'}",
        "pipeline=[seed_problems, qft, questions, responses]",
        "stages.qft.max_examples=16", "stages.qft.save_steps=2",  # 2 steps of 8
        "stages.questions.generators.0.num_questions=8",
        "stages.questions.sampling.max_tokens=96",
        "stages.responses.n=2",
        "stages.responses.sampling.max_tokens=48",  # ~35 words: the >= 20 words check below still holds
    ])
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            total = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker") and p.info["memory_info"]:
                    total += p.info["memory_info"].rss
            peak[0] = max(peak[0], total)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = pipeline.run(cfg)
    finally:
        done.set()
        sampler.join()
    assert [r["stage"] if isinstance(r, dict) else r.stage for r in results] == cfg.pipeline
    metrics = results[1]["metrics"]
    print(f"QFT SmolLM2-135M, {cfg.stages.qft.workers} worker(s), {metrics['steps']} steps: peak RSS of the workers "
          f"{peak[0] / 2**30:.2f} GiB; loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}")
    # 2 steps: the optimizer state exists from the first, and the step-2 checkpoint is saved.
    assert metrics["steps"] == 2 and peak[0] > 2**30  # the sampler saw the workers
    assert peak[0] < 12 * 10**9
    root = tmp_path / "demo"
    q = json.loads((root / "questions" / "_manifest.json").read_text())
    r = json.loads((root / "responses" / "_manifest.json").read_text())
    assert q["rows"] + q["excluded_rows"] == 8 and q["rows"] > 0
    assert r["rows"] == 2 * q["rows"]
    questions = pd.read_parquet(root / "questions" / "data")
    responses = pd.read_parquet(root / "responses" / "data")
    # the questions come from the QFT model this run exported; a real model writes real, varied text
    assert (questions["generator_model"] == str(root / "qft" / "model")).all()
    assert questions["query"].nunique() == len(questions)
    assert responses["response"].str.split().str.len().max() >= 20
    assert responses["response"].nunique() == len(responses)
    assert set(responses["finish_reason"]) <= {"stop", "length"}
    assert responses["solver_model"].iloc[0].endswith("SmolLM2-135M-Instruct")


def test_ray_job_entrypoint_reports_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nroot: runs/x\nmodels: {}\nstages: {}\n")
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "run_pipeline.py"), "--config", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: pipeline runs 'questions' but stages.questions is not configured"


def test_cli_on_its_own_local_ray_fails_fast_on_a_replica_no_node_can_hold(tiny_model, tmp_path):
    """The CLI starts a local Ray; a replica that asks for an accelerator this machine lacks fails in
    seconds with one line. (It used to wait forever: right after `ray.init()` the monitor has not
    listed any node, which was taken for an autoscaler that might still add one.)"""
    import os
    import time

    import yaml
    from conftest import tiny_config

    cfg = tiny_config(tiny_model, str(tmp_path / "root"), **{"models.tiny.scale": {"batch_size": 8, "accelerator_type": "A100"}})
    cfg["pipeline"] = ["questions"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.time()
    proc = subprocess.run([str(Path(sys.executable).parent / "scalequest-ray"), "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: stages.questions: a vLLM replica of models.tiny needs CPU 1, accelerator_type:A100 0.001; no node of "
        "this cluster (and no autoscaler adds nodes) has that (the largest node has CPU ")
    assert time.time() - start < 120
    assert not (tmp_path / "root" / "questions").exists()
