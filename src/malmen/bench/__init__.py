"""Benchmarks behind ``malmen bench``: quality (ES/GS/LS against n), speed and scale."""
from .quality import run_quality, write_outputs

__all__ = ["run_quality", "write_outputs"]
