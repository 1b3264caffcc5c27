"""malmen: edit many facts into a language model at once (MALMEN, Tan, Zhang and Fu, ICLR 2024)."""
from .datasets import load_facts
from .editor import EditHandle, EditorConfig, MalmenEditor
from .facts import Fact, FactError
from .hypernet import HyperConfig, HyperNetwork
from .models import CausalLMAdapter, load_model
from .train import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["Fact", "FactError", "load_facts", "load_model", "CausalLMAdapter", "MalmenEditor", "EditorConfig",
           "EditHandle", "HyperConfig", "HyperNetwork", "Trainer", "TrainConfig"]
