"""Run under torchrun by test_distributed.py: an edit and one meta-training step on a tiny model,
each process with its share of the facts; rank 0 writes the shifts and gradients."""
import sys

import torch

import tiny
from malmen import distributed
from malmen.editor import EditorConfig, MalmenEditor
from malmen.hypernet import HyperConfig
from malmen.io import save_tensors
from malmen.train import TrainConfig, Trainer


def build():
    torch.manual_seed(0)
    model, tok = tiny.llama(layers=3, init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=0.5), lm_batch_size=3))
    with torch.no_grad():
        for p in editor.hypernet.network_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return editor


def run(editor, facts):
    shifts = editor.shifts(facts)
    trainer = Trainer(editor, facts, facts, TrainConfig(n_edits=len(facts), c_loc=0.7), "/unused")
    stats = trainer.meta_gradients(facts, 0)  # step 0: the step-size line search runs too
    grads = {f"grad/{n}": p.grad for n, p in editor.hypernet.named_parameters() if p.grad is not None}
    state = {f"state/{k}": v for k, v in editor.hypernet.state_dict().items()}
    return {**{f"shift/{k}": v for k, v in shifts.items()}, **grads, **state,
            "stats": torch.tensor([stats["gen_loss"], stats["loc_loss"]])}


if __name__ == "__main__":
    distributed.init_from_env("cpu")
    out = run(build(), tiny.facts(10, seed=3))
    if distributed.is_main():
        save_tensors(sys.argv[1], out)
    distributed.finish(0)  # as malmen's commands end under torchrun (distributed.finish says why)
