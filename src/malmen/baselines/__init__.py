"""Baseline editors with the same interface as MalmenEditor: ``edit(facts) -> EditHandle``."""
from .ft import FineTuneConfig, FineTuneEditor

__all__ = ["FineTuneConfig", "FineTuneEditor"]
