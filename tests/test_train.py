"""QFT through Ray Train + TRL on the tiny model with 2 CPU workers: loss, export, faults, resume."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from scalequest_ray import pipeline
from scalequest_ray.config import ConfigError, load_config
from scalequest_ray.storage import InputError, Storage
from scalequest_ray.train import qft


def _cfg(tmp_path, model, **qft_over):
    raw = {
        "name": "qft", "root": str(tmp_path / "root"), "seed": 3,
        "models": {"tiny": {"path": str(model),
                            "engine": {"max_model_len": 512, "enforce_eager": True, "cpu_kv_cache_gib": 1},
                            "scale": {"batch_size": 8}},
                   "tiny_qft": {"path": "stage:qft",
                                "engine": {"max_model_len": 512, "enforce_eager": True, "cpu_kv_cache_gib": 1},
                                "scale": {"batch_size": 8}}},
        "stages": {
            "seed_problems": {},
            "qft": {"model": "tiny", "workers": 2, "batch_size": 8, "per_device_batch_size": 4,
                    "max_examples": 64, "learning_rate": 1e-3, "save_steps": 2, "max_length": 128, **qft_over},
            "questions": {"generators": [{"name": "qft", "model": "tiny_qft", "num_questions": 8}],
                          "sampling": {"max_tokens": 16}, "min_chars": 1},
        },
        "pipeline": ["seed_problems", "qft", "questions"],
    }
    path = tmp_path / "qft.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.unit
def test_qft_rows_and_completion_only_masking(tiny_model, tmp_path):
    """The real TRL collator on a real tokenized batch: loss only on question + end-of-turn."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = qft.qft_rows(tok, ["What is 3 + 4?", "  ", "A square has side 5. What is its area?"])
    assert len(rows) == 2
    assert rows[0]["prompt"].endswith("<|im_start|>user\n") and "system" in rows[0]["prompt"]
    assert rows[0]["completion"] == "What is 3 + 4?<|im_end|>"
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        args=SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to=[],
                       max_length=128),
        train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    prompt_len = len(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"])
    for i in range(2):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        supervised = ids[labels != -100]
        assert (labels[:prompt_len] == -100).all()
        text = tok.decode(supervised)
        assert text.startswith(("What is 3 + 4?", "A square has side 5.")) and "<|im_end|>" in text
        assert "<|im_start|>" not in text


@pytest.mark.unit
def test_padding_free_batch_has_the_padded_batch_loss(tiny_model, tmp_path):
    """stages.qft.padding_free: TRL concatenates the batch's questions into one row with
    position_ids restarting per question; on CPU (sdpa) transformers must mask across them, so
    the loss equals the padded batch's."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = qft.qft_rows(tok, ["What is 3 + 4?", "A square has side 5. What is its area in square centimetres?",
                              "How many primes are below 30?"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    losses = {}
    for free in (False, True):
        trainer = SFTTrainer(
            model=model, processing_class=tok, train_dataset=datasets.Dataset.from_list(rows),
            args=SFTConfig(output_dir=str(tmp_path / str(free)), per_device_train_batch_size=3, use_cpu=True,
                           report_to=[], max_length=None if free else 128, padding_free=free,
                           train_sampling_strategy="sequential"))
        batch = next(iter(trainer.get_train_dataloader()))
        if free:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no pads
        else:
            assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"] == 0).any()
        with torch.no_grad():
            losses[free] = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids",
                                                                          "labels")}).loss.item()
    assert abs(losses[True] - losses[False]) < 1e-4, losses
    # Without TRL's truncation, ours keeps prompt + completion within max_length.
    cut = qft.truncate_rows(tok, rows, 36)  # the prompt is 24 tokens, "What is 3 + 4?<|im_end|>" 9
    assert all(len(tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) <= 37 for r in cut)
    assert cut[0] == rows[0] and cut[1]["completion"] != rows[1]["completion"]
    assert rows[1]["completion"].startswith(cut[1]["completion"].strip())


# QFT with DeepSpeed ZeRO-3, its export, and generation from the exported model are tested in
# test_qpo_pairs.test_full_chain_seeds_qft_pairs_qpo_generation, whose chain starts with that QFT:
# one QFT and one engine start fewer in CI.


# A worker lost mid-run and retried from the checkpoint within the same run is tested in
# test_cluster (test_spot_loss_of_a_training_node_resumes_from_the_checkpoint): there the worker's
# node is taken back and Ray Train resumes on the replacement the autoscaler launches.


@pytest.mark.integration
def test_second_invocation_resumes_after_failed_run(tiny_model, ray_cluster, tmp_path):
    # Checkpoints at steps 3 and 6: the failed run's last one is step 6.
    cfg = load_config(_cfg(tmp_path, tiny_model, max_failures=0, save_steps=3))
    pipeline.run(cfg, stages=["seed_problems"])
    storage = Storage(cfg.root)
    with pytest.raises(Exception, match="injected failure"):
        qft.run(cfg, storage, fault={"fail_at_step": 7, "always": True})
    assert storage.manifest("qft") is None
    manifest = qft.run(load_config(_cfg(tmp_path, tiny_model, max_failures=0, save_steps=3)), storage)
    assert manifest["resumed"] and manifest["metrics"]["start_step"] == 6 and manifest["metrics"]["steps"] == 8


@pytest.mark.integration
def test_qft_bad_inputs_fail_before_training(tiny_model, ray_cluster, tmp_path):
    from ray.experimental.internal_kv import _internal_kv_exists

    from scalequest_ray.capacity import has_autoscaler

    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"problem": "What is 1+1?"}\n')
    cfg = load_config(_cfg(tmp_path, tiny_model, input=str(bad)))
    with pytest.raises(InputError, match="has no 'query' column"):
        qft.run(cfg, Storage(cfg.root))
    with pytest.raises(ConfigError, match="local model directory /nope/model does not exist"):
        load_config(_cfg(tmp_path, tiny_model), ["models.tiny.path=/nope/model"])
    good = tmp_path / "ok.jsonl"
    good.write_text('{"query": "What is 1+1?"}\n')
    cfg = load_config(_cfg(tmp_path, tiny_model, input=str(good), workers=8, batch_size=32, deepspeed="zero3"))
    # A local Ray runs the autoscaler's monitor too (read-only: it never adds a node). Once it has
    # published its status, the cluster must still count as fixed, or the check below is skipped
    # and Ray Train waits forever for 8 CPUs.
    end = time.time() + 60
    while not _internal_kv_exists("__autoscaling_status") and time.time() < end:
        time.sleep(0.5)
    assert _internal_kv_exists("__autoscaling_status") and not has_autoscaler()
    with pytest.raises(InputError, match=r"8 workers x 1 CPU need 8 CPUs, the cluster has 6"):
        qft.run(cfg, Storage(cfg.root))
    assert not (tmp_path / "root" / "qft" / "ray").exists()


# The SmolLM2 QFT on 2 CPU workers and its peak memory are checked in test_e2e's demo run, which
# generates its questions with that QFT model.


@pytest.mark.integration
def test_qpo_pairs_file_without_pair_columns_fails_before_training(tiny_model, ray_cluster, tmp_path):
    from scalequest_ray.train import qpo

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "What is 2+2?"}\n')
    path = _cfg(tmp_path, tiny_model)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["qpo"] = {"model": "tiny", "input": str(bad), "batch_size": 8, "per_device_batch_size": 4}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    with pytest.raises(InputError, match=f"input {bad} has no 'rejected' column"):
        qpo.run(cfg, Storage(cfg.root))
    assert not (tmp_path / "root" / "qpo").exists()
