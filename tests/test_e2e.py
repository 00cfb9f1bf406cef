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
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={tmp_path / 'demo'}",
        "pipeline=[questions, responses]",
        "stages.questions.generators.0.num_questions=8",
        "stages.questions.sampling.max_tokens=160",
        "stages.responses.n=2",
        "stages.responses.sampling.max_tokens=160",
    ])
    results = pipeline.run(cfg)
    assert [r.stage for r in results] == ["questions", "responses"]
    root = tmp_path / "demo"
    q = json.loads((root / "questions" / "_manifest.json").read_text())
    r = json.loads((root / "responses" / "_manifest.json").read_text())
    assert q["rows"] + q["excluded_rows"] == 8 and q["rows"] > 0
    assert r["rows"] == 2 * q["rows"]
    questions = pd.read_parquet(root / "questions" / "data")
    responses = pd.read_parquet(root / "responses" / "data")
    # a real model writes real, varied text
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
