"""QPO (question preference optimisation, ScaleQuest stage 2): DPO of the QFT model on pairs of
(prompt = user-turn prefix, chosen = optimizer's rewrite, rejected = original question).

TRL's DPOTrainer with the reference model = a frozen copy of the starting policy, i.e. the QFT
model; same Ray Train run, checkpoints, resume and export as QFT (<root>/qpo/model/).
"""

from __future__ import annotations

from typing import Optional

from ..config import RunConfig, instance_suffix
from ..storage import InputError, Storage, read_input
from ..text import turn_template
from .common import common_args, read_columns, run_training, scratch_dir, train_and_export, worker_setup


def dpo_rows(tokenizer, pairs: dict) -> list[dict]:
    eot = turn_template(tokenizer).end_of_turn
    return [{"prompt": p, "chosen": c.strip() + eot, "rejected": r.strip() + eot}
            for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]


def train_loop(c: dict) -> None:
    """Runs on every Ray Train worker."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = worker_setup(c)
    rows = dpo_rows(tokenizer, read_columns(c["data_uri"], c["endpoint"], ["prompt", "chosen", "rejected"],
                                            c["max_examples"]))
    args = DPOConfig(beta=c["beta"], loss_type=c["loss_type"], **common_args(c, scratch_dir(c, "qpo")))
    # ref_model=None: TRL keeps a frozen copy of the starting policy (the QFT model) as reference.
    train_and_export(DPOTrainer, c, model, tokenizer, datasets.Dataset.from_list(rows), args, ref_model=None)


def run(cfg: RunConfig, storage: Storage, stage: str = "qpo", force: bool = False, fault: Optional[dict] = None,
        echo=print, depends_on: str = "") -> dict:
    """The `qpo` stage, or a named instance qpo@<generator>, which trains on the pairs of
    qpo_pairs@<generator> unless it has an `input`. `depends_on`: hashes of the training stages
    whose exported model this one starts from."""
    tcfg = cfg.section(stage)
    pairs_stage = "qpo_pairs" + instance_suffix(stage)
    if tcfg.input:
        data_uri, upstream = tcfg.input, "input:" + tcfg.input
        # A bad pairs file fails here in one line, not inside the training workers.
        read_input(data_uri, cfg.storage.endpoint_url, required_column=["prompt", "chosen", "rejected"])
    else:
        pairs = storage.manifest(pairs_stage)
        if pairs is None:
            raise InputError(f"the {pairs_stage} stage has not finished in this run root; run it first or set "
                             f"stages.{stage}.input")
        if pairs["rows"] == 0:
            raise InputError(f"the {pairs_stage} stage kept no pairs ({pairs['excluded_by_reason']}); nothing to train on")
        data_uri, upstream = storage.uri(pairs_stage, "data"), f"{pairs_stage}:" + pairs["config_hash"]
    loop_config = {**tcfg.model_dump(mode="json"), "accumulation": tcfg.accumulation,
                   "model_path": cfg.models[tcfg.model].path, "data_uri": data_uri, "fault": fault}
    upstream = "|".join(filter(None, [upstream, depends_on]))
    return run_training(cfg, storage, stage, train_loop, loop_config, upstream, force=force, echo=echo)
