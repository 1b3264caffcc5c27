"""precision.py and the GPU-minded paths that rest on it: exact half-precision products, the
hyper-network's reduced-precision products against fp32, host-side batch indices, the cache's dtype."""
import pytest
import torch

import tiny
from malmen.cache import StepCache
from malmen.editor import EditorConfig, MalmenEditor, finetune_loss, trace
from malmen.hypernet import HyperConfig, Normaliser
from malmen.precision import PRECISIONS, _TF32Product, exact_product, matmul, tf32


def test_tf32_context_restores_the_setting():
    matmul_flags = torch.backends.cuda.matmul
    read = (lambda: matmul_flags.fp32_precision) if hasattr(matmul_flags, "fp32_precision") else (lambda: matmul_flags.allow_tf32)
    before = read()
    with tf32():
        assert read() in ("tf32", True)
        with tf32(False):
            assert read() in ("ieee", False)
        assert read() in ("tf32", True)
    assert read() == before


def test_exact_product_of_half_precision_operands_equals_the_fp64_product_rounded_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g).bfloat16()
    y = torch.randn(300, 48, generator=g).bfloat16()
    p = exact_product(x.t(), y)
    reference = x.double().t() @ y.double()
    assert p.dtype == torch.float32
    # every term is exact; only the fp32 sum of 300 terms rounds
    assert torch.allclose(p.double(), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


def test_tf32_product_backward_equals_autograd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_TF32Product.apply, (x, w))


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_products_stay_close_to_fp32_and_differentiate(precision):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 40, generator=g, requires_grad=True)
    w = torch.randn(40, 8, generator=g, requires_grad=True)
    exact = x @ w
    approx = matmul(x, w, precision)
    relative = (approx - exact).norm() / exact.norm()
    assert relative < (1e-2 if precision == "bf16" else 1e-6)  # tf32 is fp32 on a CPU
    approx.sum().backward()
    assert x.grad is not None and w.grad is not None
    with pytest.raises(ValueError, match="precision must be one of"):
        matmul(x, w, "fp8")


def test_bf16_hypernetwork_shifts_and_gradients_are_close_to_fp32():
    """The accuracy of a reduced-precision hyper-network, end to end: the same trained-looking
    editor (random blocks, not the identity) in fp32 and bf16 gives shifts within 2% and
    hyper-network gradients pointing the same way."""
    model, tok = tiny.llama(), tiny.tokenizer()
    facts = tiny.facts(6)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), hyper_precision=precision))
        with torch.no_grad():
            for p in editor.hypernet.network_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        shifts = editor.shifts(facts)
        (batch,) = editor.batches(facts)
        keys, grads = trace(editor.adapter, editor.modules, batch)
        with torch.enable_grad():
            loss = sum((chunk[m].differences() ** 2).sum() for chunk in editor.chunks(keys, grads) for m in chunk)
            loss.backward()
        results[precision] = shifts, torch.cat([p.grad.flatten() for p in editor.hypernet.network_parameters() if p.grad is not None])
    (s32, g32), (s16, g16) = results["fp32"], results["bf16"]
    assert any(not torch.equal(s16[m], s32[m]) for m in s32)  # bf16 was used ...
    for m in s32:
        assert (s16[m] - s32[m]).norm() / s32[m].norm() < 2e-2, m
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.999  # ... and cost little


def test_unknown_hyper_precision_is_refused():
    with pytest.raises(ValueError, match="hyper_precision"):
        MalmenEditor(tiny.llama(), tiny.tokenizer(), EditorConfig(hyper_precision="fp8"))


def test_host_side_indices_select_what_the_boolean_masks_select():
    model, tok = tiny.llama(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8)))
    batch = next(iter(editor.batches(tiny.facts(5))))
    assert batch.answer_rows is not None and batch.input_rows is not None  # found on the host by .to()
    assert torch.equal(batch.answer_rows, batch.mask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(batch.input_rows, batch.attention_mask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(batch.answer_targets(), batch.targets[batch.mask])
    logits = editor.adapter.answer_logits(batch)
    # finetune_loss: the sum over facts of each fact's mean token loss, as a boolean-mask reference
    token_loss = torch.nn.functional.cross_entropy(logits, batch.targets[batch.mask], reduction="none")
    per_row = torch.zeros(len(batch)).index_add_(0, batch.mask.nonzero()[:, 0], token_loss)
    reference = (per_row / batch.mask.sum(1)).sum()
    assert torch.allclose(finetune_loss(logits, batch), reference)


def test_normaliser_merge_takes_a_tensor_count_and_ignores_an_empty_batch():
    norm = Normaliser(3)
    x = torch.randn(10, 3)
    norm.merge(torch.tensor(10.0, dtype=torch.float64), x.mean(0), x.var(0, unbiased=False))
    mean, var = norm.mean.clone(), norm.var.clone()
    norm.merge(torch.zeros((), dtype=torch.float64), torch.full((3,), 7.0), torch.full((3,), 9.0))
    assert torch.equal(norm.mean, mean) and torch.equal(norm.var, var) and float(norm.count) == 10
    assert torch.allclose(mean, x.mean(0), atol=1e-6)


def test_cache_never_widens_what_was_traced(tmp_path):
    half = {"m": torch.randn(4, 3).bfloat16()}
    with StepCache("fp32") as cache:
        (kept,) = cache.put(half)
        assert kept["m"].dtype == torch.bfloat16 and torch.equal(kept["m"], half["m"])
    with StepCache("fp32", budget_mb=0.0, directory=str(tmp_path)) as cache:  # spilled to a file
        (spilled,) = cache.put(half)
        assert spilled["m"].dtype == torch.bfloat16 and torch.equal(spilled["m"], half["m"])
    with StepCache("bf16") as cache:
        (narrowed,) = cache.put({"m": torch.randn(4, 3)})
        assert narrowed["m"].dtype == torch.bfloat16


def test_the_command_line_offers_exactly_the_precisions_there_are():
    """The parsers name them without importing torch; they must not drift from precision.py."""
    from malmen.cli.common import HYPER_PRECISIONS

    assert HYPER_PRECISIONS == PRECISIONS
