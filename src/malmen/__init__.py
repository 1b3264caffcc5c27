"""malmen: edit many facts into a language model at once (MALMEN, Tan, Zhang and Fu, ICLR 2024)."""
from .datasets import load_facts
from .editor import EditHandle, EditorConfig, MalmenEditor
from .facts import Fact, FactError
from .hypernet import HyperConfig, HyperNetwork
from .adapters import CausalLMAdapter, ClassifierAdapter, Seq2SeqAdapter, adapter_for
from .models import load_model
from .train import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["Fact", "FactError", "load_facts", "load_model", "CausalLMAdapter", "Seq2SeqAdapter", "ClassifierAdapter", "adapter_for", "MalmenEditor", "EditorConfig",
           "EditHandle", "HyperConfig", "HyperNetwork", "Trainer", "TrainConfig"]
