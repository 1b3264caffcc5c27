import pytest
import torch

from malmen.hypernet import HyperConfig, HyperNetwork, Normaliser


def test_identity_at_init_and_shared_by_shape():
    net = HyperNetwork({"a": (6, 4), "b": (6, 4), "c": (5, 3)}, HyperConfig(rank=3))
    assert sorted(net.nets) == ["5x3", "6x4"]
    assert net.index["b"] == ("6x4", 1)
    k, g = torch.randn(7, 6), torch.randn(7, 4)
    pk, pg = net("a", k, g)
    # normaliser starts at mean 0, var 1: the whole network is the identity
    assert torch.allclose(pk, k) and torch.allclose(pg, g)


def test_normaliser_matches_full_statistics():
    norm = Normaliser(3)
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 1e-4, 10.0]) + torch.tensor([5.0, 0.01, -3.0])
    for s in range(0, 100, 13):
        norm.update(x[s:s + 13])
    assert torch.allclose(norm.mean, x.mean(0), rtol=1e-5)
    assert torch.allclose(norm.var, x.var(0, unbiased=False), rtol=1e-4)
    y = norm(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(3), atol=1e-3)


def test_editing_does_not_touch_the_normaliser():
    import tiny
    from malmen.editor import EditorConfig, MalmenEditor

    model, tok = tiny.llama(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=4)))
    state = {k: v.clone() for k, v in editor.hypernet.state_dict().items()}
    editor.edit(tiny.facts(4)).revert()
    assert all(torch.equal(v, editor.hypernet.state_dict()[k]) for k, v in state.items())


def test_every_parameter_gets_a_gradient_at_init():
    net = HyperNetwork({"a": (6, 4), "b": (6, 4)}, HyperConfig(rank=3, n_blocks=2))
    pk, pg = net("a", torch.randn(5, 6), torch.randn(5, 4))
    (pk.sum() * 0.3 + (pg ** 2).sum()).backward()
    for name, p in net.nets.named_parameters():
        if name.endswith(("U", "scale")):
            continue  # these get a gradient once V has moved off zero
        grad = p.grad[0] if name.endswith(("scale", "shift")) else p.grad  # module "a" is index 0
        assert grad is not None and grad.abs().sum() > 0, name


def _trained(shapes, seed=0):
    """A network whose every parameter and normaliser is off its initial value."""
    torch.manual_seed(seed)
    net = HyperNetwork(shapes, HyperConfig(rank=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for shape_net in net.nets.values():
            shape_net.normaliser.update(torch.randn(50, shape_net.a + shape_net.b) * 2 + 1)
    return net


def test_transplant_keeps_old_modules_and_copies_sources():
    from malmen.hypernet import nearest_sources

    old_shapes = {"l2": (6, 4), "l3": (6, 4), "x": (5, 3)}
    old = _trained(old_shapes)
    new_shapes = {"l0": (6, 4), "l1": (6, 4), "l2": (6, 4), "l3": (6, 4), "x": (5, 3)}
    order = ["l0", "l1", "l2", "l3", "x"]
    sources = nearest_sources(order, new_shapes, old_shapes)
    assert sources == {"l0": "l2", "l1": "l2", "l2": "l2", "l3": "l3", "x": "x"}
    new = old.transplant(new_shapes, sources, eta_factor=0.5)
    for name in new_shapes:
        a, b = new_shapes[name]
        k, g = torch.randn(7, a), torch.randn(7, b)
        for got, want in zip(new(name, k, g), old(sources[name], k, g)):
            assert torch.equal(got, want), name
        assert torch.allclose(new.eta(name), old.eta(sources[name]) * 0.5)
        assert torch.equal(new.lam(name), old.lam(sources[name]))
    # the copy is independent of the original
    new.nets["6x4"].blocks[0].V.data.zero_()
    assert old.nets["6x4"].blocks[0].V.abs().sum() > 0


def test_transplant_refuses_a_wrong_source():
    import pytest

    old = _trained({"a": (6, 4), "b": (5, 3)})
    with pytest.raises(ValueError, match="shape"):
        old.transplant({"c": (6, 4)}, {"c": "b"})
    with pytest.raises(ValueError, match="not one of"):
        old.transplant({"c": (6, 4)}, {"c": "zz"})


def test_widening_keeps_every_output_and_gives_the_new_rank_gradients():
    shapes = {"a": (6, 4), "b": (6, 4), "c": (5, 3)}
    net = _trained(shapes)
    wide = net.widened(7)
    assert wide.config.rank == 7 and all(b.U.shape[1] == 7 and b.V.shape[0] == 7 for n in wide.nets.values() for b in n.blocks)
    for name, (a, b) in shapes.items():
        keys, grads = torch.randn(9, a), torch.randn(9, b)
        for x, y in zip(net(name, keys, grads), wide(name, keys, grads)):
            assert torch.allclose(x, y, atol=1e-5)
        assert torch.equal(wide.eta(name), net.eta(name)) and torch.equal(wide.lam(name), net.lam(name))
    pk, pg = wide("a", torch.randn(5, 6), torch.randn(5, 4))
    (pk.sum() + (pg ** 2).sum()).backward()
    block = wide.nets["6x4"].blocks[0]
    assert block.V.grad[3:].abs().sum() > 0  # the new rows of V learn at once
    with pytest.raises(ValueError, match="only be widened"):
        wide.widened(2)


def test_an_editor_saved_before_lambda_s_exponent_loads_with_alpha_zero(tmp_path):
    """Files without ``lambda_exponent`` (every editor saved before it) load with alpha = 0, where
    lambda(N) is lambda for every N; alpha scales lambda by (N / N0)^alpha."""
    from malmen import io

    shapes = {"a": (6, 4), "b": (5, 3)}
    net = _trained(shapes)
    old = {k: v for k, v in net.state_dict().items() if k != "lambda_exponent"}
    io.save_tensors(tmp_path / "old.safetensors", old)
    with torch.no_grad():
        net.lambda_exponent.fill_(0.7)   # the loaded file must overwrite it
    loaded = HyperNetwork.from_file(tmp_path / "old.safetensors", shapes, net.config)
    assert torch.equal(loaded.lambda_exponent, torch.zeros(2))
    for name in shapes:
        assert torch.equal(loaded.lam(name, 3.0), loaded.lam(name)) and torch.equal(loaded.lam(name, 9e5), loaded.lam(name))
    with torch.no_grad():
        loaded.lambda_exponent.fill_(-0.5)
    ref = loaded.config.lambda_tokens_ref
    assert torch.allclose(loaded.lam("a", 4 * ref), loaded.lam("a") / 2)
