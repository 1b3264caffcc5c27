"""Models of real shapes with random weights, for speed and memory only (``bench speed --shape``).

Time and memory depend on the shapes, not on the weights, so a GPU measurement needs no
checkpoint download: the model is built on the device from a transformers config, in the dtype
asked for.  Quality figures never come from these models.
"""
from __future__ import annotations

import torch

SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         tie_word_embeddings=True, max_position_embeddings=8192)),
    "llama3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      max_position_embeddings=8192, rope_theta=500000.0)),
    "gptj-6b": ("GPTJConfig", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)),
}


def random_model(shape: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """A causal LM of ``shape`` (a key of SHAPES) with random weights, built directly on ``device``."""
    import transformers

    from ..models import prepare

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    config_name, fields = SHAPES[shape]
    config = getattr(transformers, config_name)(**fields)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.name_or_path = f"random:{shape}"
    return prepare(model)
