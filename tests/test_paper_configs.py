"""The paper configs describe the published method: every stage, model, sampling setting and
resource of ScaleQuest (../shared/SCALEQUEST.md), and they pass `validate` and `plan --offline`
from the CLI without Ray. No model, no cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scalequest_ray.config import ConfigError, RunConfig, load_config
from scalequest_ray.plan import plan

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
GENERATORS = {"qwen": "Qwen/Qwen2-Math-7B-Instruct", "deepseek": "deepseek-ai/deepseek-math-7b-rl"}
RELEASED = {"dyyyyyyyy/ScaleQuest-Qwen2-Math-7B-QGen", "dyyyyyyyy/ScaleQuest-DeepSeekMath-7B-QGen"}
FILTERS_ON = ["questions", "language", "dedup", "solvability", "difficulty_labels", "difficulty_scorer", "difficulty",
              "responses", "reward", "selection"]


def _cli(*args) -> subprocess.CompletedProcess:
    code = ("import sys; from scalequest_ray import cli; rc = cli.main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules and 'vllm' not in sys.modules; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["paper_gpu.yaml", "scalequest_qgen.yaml"])
def test_validate_and_plan_offline_from_the_cli(name):
    path = f"configs/{name}"
    ok = _cli("validate", path)
    assert ok.returncode == 0 and ": ok (run " in ok.stdout, ok.stderr
    shown = _cli("plan", path, "--offline")
    assert shown.returncode == 0, shown.stderr
    cfg = load_config(REPO / path)
    for i, stage in enumerate(cfg.pipeline, 1):
        assert f"{i:>2}. {stage}: " in shown.stdout


def _shared_method(cfg: RunConfig, rows: dict):
    """What both configs share with the paper from question generation on."""
    q = cfg.stages.questions
    assert [g.num_questions for g in q.generators] == [1_000_000, 1_000_000]  # 1M per generator, mixed
    assert (q.sampling.temperature, q.sampling.top_p, q.sampling.max_tokens) == (1.0, 0.99, 512)
    assert cfg.stages.language.languages == ["en"]
    assert {b.name for b in cfg.stages.dedup.decontaminate} == {"gsm8k_test", "math_test"}
    solver = cfg.models[cfg.stages.responses.model].path
    assert solver == "Qwen/Qwen2-Math-7B-Instruct"
    judge = cfg.stages.solvability
    assert cfg.models[judge.model].path == solver and judge.sampling.temperature == 0.0  # the solver, greedy
    assert judge.sampling.max_tokens <= 512 and judge.constrained  # within the paper's budget, always a verdict
    labels = cfg.stages.difficulty_labels
    assert cfg.models[labels.model].path == solver and labels.k == 8
    assert {s.answer_format for s in labels.sources} == {"gsm8k", "boxed"}
    assert cfg.models[cfg.stages.difficulty.model].path == "stage:difficulty_scorer"
    assert 0.05 <= cfg.stages.difficulty.drop_easiest <= 0.15  # the paper dropped 9.2% as too easy
    r = cfg.stages.responses
    assert (r.n, r.sampling.temperature, r.sampling.top_p, r.sampling.max_tokens) == (5, 0.7, 0.95, 2048)
    assert r.instruction.endswith("put your final answer within \\boxed{}.")
    reward = cfg.stages.reward
    assert cfg.models[reward.model].path == "internlm/internlm2-7b-reward" and reward.method == "get_scores"
    assert cfg.models[reward.model].engine.trust_remote_code
    # Resources: every engine and scorer on GPU replicas, training on GPU workers.
    for name in {g.model for g in q.generators} | {r.model, judge.model, reward.model, cfg.stages.difficulty.model}:
        assert cfg.models[name].scale.gpus_per_replica >= 1, name
    assert cfg.stages.difficulty_scorer.gpus_per_worker >= 1
    # Where each stage runs: engines on vLLM, the remote-code reward model on the HF pool, the
    # trained Qwen2 difficulty scorer on vLLM's classify task.
    assert rows["responses"]["runs_on"] == "vLLM replica pool" and "1 GPU" in rows["responses"]["model"]
    assert rows["reward"]["runs_on"] == "scoring actor pool"
    assert rows["difficulty"]["runs_on"] == "vLLM replica pool (classify)"
    assert rows["selection"]["output"] == f"{cfg.root}/selection"


def test_paper_gpu_runs_the_whole_published_method():
    cfg = load_config(REPO / "configs" / "paper_gpu.yaml")
    rows = {r["stage"]: r for r in plan(cfg, check_storage=False)}
    per_generator = [f"{kind}@{g}" for g in GENERATORS for kind in ("qft", "qpo_pairs", "qpo")]
    assert cfg.pipeline == ["seed_problems", *per_generator, *FILTERS_ON]
    sources = {(s.hub, s.subset) for s in cfg.stages.seed_problems.sources}
    assert ("openai/gsm8k", "main") in sources and sum(h == "EleutherAI/hendrycks_math" for h, _ in sources) == 7
    generators = {g.model: g for g in cfg.stages.questions.generators}
    assert {cfg.models[m].path for m in generators} == {"stage:qpo@qwen", "stage:qpo@deepseek"}
    for g, base in GENERATORS.items():
        qft = cfg.section(f"qft@{g}")
        assert cfg.models[qft.model].path == base
        assert (qft.epochs, qft.learning_rate, qft.lr_scheduler, qft.warmup_ratio, qft.batch_size, qft.max_length,
                qft.precision, qft.deepspeed) == (1, 2e-5, "cosine", 0.03, 32, 256, "bf16", "zero3")
        assert qft.gpus_per_worker >= 1 and rows[f"qft@{g}"]["input"] == f"{cfg.root}/seed_problems/data"
        pairs = cfg.section(f"qpo_pairs@{g}")
        assert cfg.models[pairs.generator].path == f"stage:qft@{g}" and pairs.num_questions == 10_000
        assert pairs.optimizer_http.model == "gpt-4o-mini" and pairs.optimizer_sampling.temperature == 0.0
        assert pairs.optimizer_http.api_key_env == "OPENAI_API_KEY"
        assert "gpt-4o-mini" in rows[f"qpo_pairs@{g}"]["detail"]
        dpo = cfg.section(f"qpo@{g}")
        assert cfg.models[dpo.model].path == f"stage:qft@{g}"  # policy start AND reference model
        assert (dpo.beta, dpo.learning_rate, dpo.batch_size, dpo.epochs, dpo.loss_type) == (0.1, 5e-7, 128, 1, "sigmoid")
        assert rows[f"qpo@{g}"]["input"] == f"{cfg.root}/qpo_pairs@{g}/data"
        assert rows[f"qpo@{g}"]["output"] == f"{cfg.root}/qpo@{g}"
    # Each instance is its own stage: its own fingerprint (and so its own manifest and resume).
    assert cfg.stage_fingerprint("qft@qwen") != cfg.stage_fingerprint("qft@deepseek")
    _shared_method(cfg, rows)


def test_scalequest_qgen_starts_from_the_released_generators():
    cfg = load_config(REPO / "configs" / "scalequest_qgen.yaml")
    rows = {r["stage"]: r for r in plan(cfg, check_storage=False)}
    assert cfg.pipeline == FILTERS_ON  # no training
    assert {cfg.models[g.model].path for g in cfg.stages.questions.generators} == RELEASED
    _shared_method(cfg, rows)


def test_named_instances_are_checked_like_their_kind(tmp_path):
    raw = (REPO / "configs" / "paper_gpu.yaml").read_text()
    cases = {
        "stages.qft@qwen.learning_rate=-1": "stages.qft@qwen.learning_rate: Input should be greater than 0",
        "stages.qft@qwen.bogus=1": "stages.qft@qwen.bogus: unknown field",
        "stages.language@x={}": "language@x: only qft, qpo_pairs, qpo run as named instances",
        "stages.qpo@deepseek.model=ghost": "stages.qpo@deepseek.model: model 'ghost' is not defined under models",
        "pipeline=[qft@nobody]": "pipeline runs 'qft@nobody' but stages.qft@nobody is not configured",
        "models.qwen-qgen.path=stage:questions@qwen": "only stage:qft or stage:qpo or stage:difficulty_scorer",
    }
    path = tmp_path / "paper.yaml"
    path.write_text(raw)
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(path, [override])
        assert expected in str(err.value), (override, str(err.value))
        assert "\n" not in str(err.value)
