"""Reward/difficulty scoring: a tiny random sequence-classification model through a Ray Data actor
pool (batch > 1 == batch 1); vLLM's classify task ranking rows like the HF pool, for the tiny model
and SmolLM2 with a head; and a trust_remote_code model with its own get_scores()."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from scalequest_ray.config import ModelConfig
from scalequest_ray.scoring import Scorer, score

pytestmark = pytest.mark.integration

ROWS = [
    {"query": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is \\boxed{5}."},
    {"query": "A farmer has 12 cows and buys 5 more. How many cows are there now?", "response": "12 + 5 = 17 cows."},
    {"query": "Find x if 3x = 12.", "response": "Divide both sides by 3: x = 4, so the answer is 4, which we can "
                                                  "check by substituting back: 3 * 4 = 12."},
    {"query": "How many sides does a hexagon have?", "response": "Six."},
    {"query": "What is 10% of 250?", "response": "0.1 * 250 = 25"},
]


def _kwargs(path, **over):
    kw = dict(model_path=str(path), endpoint=None, out="reward", pairs=True, method="sequence_classification",
              max_length=256, dtype="float32", trust_remote_code=False)
    kw.update(over)
    return kw


def test_batched_actor_pool_matches_batch_of_one(tiny_reward, ray_cluster):
    import ray

    ds = ray.data.from_items(ROWS * 3)  # 15 rows of different lengths: padding inside every batch

    def scores(batch_size: int) -> list[float]:
        out = ds.map_batches(Scorer, batch_format="pyarrow", batch_size=batch_size, concurrency=1, num_cpus=1,
                             fn_constructor_kwargs=_kwargs(tiny_reward, device_batch=batch_size))
        return [r["reward"] for r in out.take_all()]  # 15 rows: fine to collect in a test

    one, many = scores(1), scores(8)
    assert len(one) == len(many) == 15
    assert many == pytest.approx(one, abs=1e-4)
    assert len({round(s, 5) for s in one[:5]}) == 5  # a real model: different texts, different scores
    assert one[:5] == pytest.approx(one[5:10], abs=1e-5)  # deterministic


def _pairs(n: int) -> list[dict]:
    """(question, response) pairs of varied length, as a reward stage sees them."""
    import random

    rng = random.Random(0)
    words = "apples pencils train farmer tank litres rectangle triangle angle sum price discount hours speed".split()
    out = []
    for i in range(n):
        q = f"A shop has {rng.randint(2, 500)} {rng.choice(words)}. " + " ".join(rng.choices(words, k=rng.randint(3, 30))) + "?"
        steps = " ".join(f"Step {k}: {rng.choice(words)} {rng.randint(1, 99)}." for k in range(rng.randint(1, 12)))
        out.append({"idx": i, "query": q, "response": steps + f" The answer is \\boxed{{{i}}}."})
    return out


def hf_scores(path, rows: list[dict], max_length: int = 256) -> list[float]:
    """The HF pool's scores for `rows`, computed in this process by the same Scorer its actors run."""
    scorer = Scorer(**_kwargs(path, max_length=max_length))
    return scorer.score([r["query"] for r in rows], [r["response"] for r in rows])


def assert_same_ranking(reference: list[float], vllm: list[float]) -> float:
    """vLLM's classify scores rank rows like the HF forward (Spearman >= 0.99), and are raw head
    outputs (no sigmoid) close to it."""
    from scipy.stats import spearmanr

    rho = spearmanr(reference, vllm).statistic
    assert rho >= 0.99, rho
    assert len(set(round(s, 6) for s in vllm)) > 0.8 * len(vllm)  # real, varied scores
    assert vllm == pytest.approx(reference, abs=0.05)  # logits, not sigmoid(logit)
    return rho


def test_vllm_classify_ranks_rows_like_the_hf_pool_smollm2(demo_reward, ray_cluster):
    """SmolLM2 with a one-output head through the reward stage's vLLM engine (Ray Data LLM,
    classify) against the HF pool's scorer on the same rows. (The tiny reward model's comparison
    is in the pipeline test, whose reward stage runs on vLLM.)"""
    import ray

    model = ModelConfig(path=str(demo_reward), engine={"dtype": "float32", "max_model_len": 512, "enforce_eager": True,
                                                       "cpu_kv_cache_gib": 1}, scale={"batch_size": 16})
    rows = _pairs(16)
    ds = ray.data.from_items(rows, override_num_blocks=2)
    out = score(ds, model, out="reward", pairs=True, method="sequence_classification", max_length=256,
                engine="vllm", endpoint=None).select_columns(["idx", "reward", "score_error"])
    got = sorted(out.take_all(), key=lambda r: r["idx"])  # 16 rows: fine to collect in a test
    assert [r["idx"] for r in got] == list(range(16)) and not any(r["score_error"] for r in got)
    assert_same_ranking(hf_scores(demo_reward, rows), [r["reward"] for r in got])


def test_trust_remote_code_get_scores(tiny_model, tmp_path):
    """InternLM2-Reward style: the model's own get_scores(chats, tokenizer), loaded with trust_remote_code."""
    model_dir = tmp_path / "toy-reward"
    model_dir.mkdir()
    (model_dir / "configuration_toy.py").write_text(textwrap.dedent('''
        from transformers import PretrainedConfig

        class ToyRewardConfig(PretrainedConfig):
            model_type = "toy_reward"

            def __init__(self, vocab_size=50000, **kwargs):
                super().__init__(**kwargs)
                self.vocab_size = vocab_size
    '''))
    (model_dir / "modeling_toy.py").write_text(textwrap.dedent('''
        import torch
        from transformers import PreTrainedModel
        from .configuration_toy import ToyRewardConfig

        class ToyReward(PreTrainedModel):
            config_class = ToyRewardConfig

            def __init__(self, config):
                super().__init__(config)
                self.weight = torch.nn.Embedding(config.vocab_size, 1)
                self.post_init()

            def get_scores(self, chats, tokenizer):
                texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
                out = []
                for t in texts:
                    ids = torch.tensor(tokenizer(t)["input_ids"])
                    out.append(float(self.weight(ids).mean()))
                return out
    '''))
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "toy_reward", "architectures": ["ToyReward"], "vocab_size": len(tokenizer),
        "auto_map": {"AutoConfig": "configuration_toy.ToyRewardConfig", "AutoModel": "modeling_toy.ToyReward"},
    }))
    torch.manual_seed(0)
    save_file({"weight.weight": torch.randn(len(tokenizer), 1)}, str(model_dir / "model.safetensors"))
    scorer = Scorer(**_kwargs(model_dir, method="get_scores", trust_remote_code=True))
    scores = scorer.score([r["query"] for r in ROWS], [r["response"] for r in ROWS])
    assert len(scores) == 5 and len(set(scores)) == 5
    assert scorer.score([ROWS[0]["query"]], [ROWS[0]["response"]]) == pytest.approx(scores[:1])
    shutil.rmtree(model_dir)

