"""malmen: edit many facts into a language model at once (MALMEN, Tan, Zhang and Fu, ICLR 2024).

Names are imported on first use (PEP 562), so that ``import malmen`` and the command line's input
checks run in a fraction of a second, before torch and transformers are loaded.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Fact": "facts", "FactError": "facts", "load_facts": "datasets", "load_model": "models",
    "CausalLMAdapter": "adapters", "Seq2SeqAdapter": "adapters", "ClassifierAdapter": "adapters",
    "adapter_for": "adapters", "MalmenEditor": "editor", "EditorConfig": "editor", "EditHandle": "editor",
    "HyperConfig": "hypernet", "HyperNetwork": "hypernet", "Trainer": "train", "TrainConfig": "train",
    "FineTuneEditor": "baselines", "FineTuneConfig": "baselines", "methods": "methods",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'malmen' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    value = module if name == _WHERE[name] else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
