import torch

import tiny
from malmen.editor import EditHandle
from malmen.adapters import CausalLMAdapter


def test_replayed_trunk_gives_the_same_logits_after_an_edit():
    for model in (tiny.llama(layers=5), tiny.gpt2(layers=4)):
        adapter = CausalLMAdapter(model, tiny.tokenizer())
        modules = adapter.default_modules(2)
        facts = tiny.facts(6)
        batches = [adapter.batch([f.prompt for f in facts[:3]], [f.target for f in facts[:3]]),
                   adapter.batch([f.locality_prompt for f in facts[3:]], [f.locality_answer for f in facts[3:]])]
        trunk = adapter.trunk(modules)
        assert trunk.upto == len(adapter.blocks()[1]) - 2
        with torch.no_grad():
            for b in batches:
                with trunk.step():
                    adapter.answer_logits(b)
        trunk.rewind()
        shifts = {n: 0.1 * torch.randn(*reversed(model.get_submodule(n).weight.shape))
                  if isinstance(model.get_submodule(n), torch.nn.Linear) else 0.1 * torch.randn_like(model.get_submodule(n).weight)
                  for n in modules}
        with EditHandle(model, shifts), torch.no_grad():
            full = [adapter.answer_logits(b) for b in batches]
            replayed = []
            for b in batches:
                with trunk.step():
                    replayed.append(adapter.answer_logits(b))
        for f, r in zip(full, replayed):
            assert torch.allclose(f, r, atol=1e-5)
        blocks = adapter.blocks()[1]
        assert all(type(b).__name__ != "_Replayed" for b in blocks)
