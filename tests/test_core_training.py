"""Acceptance 3: a rewritten model trains. A few optimizer steps lower the loss, and after one backward
pass every connection parameter (``hc.*``) has a gradient that is not None and not all zero."""
import pytest
import torch
import torch.nn.functional as F

from hc_rewrite.zoo import ZOO

from .helpers import VARIANTS, inputs, main_output

LM = {"gpt2", "llama"}
TRAIN_SEED = 77  # inputs of the training batch (neither the capture nor the comparison inputs)


def _loss_fn(name, new):
    args, kwargs = inputs(name, TRAIN_SEED, batch=4, seq=8)
    target = None
    if name not in LM:
        with torch.no_grad():
            shape = main_output(new(*args, **kwargs)).shape
        target = torch.randn(shape, generator=torch.Generator().manual_seed(5))

    def loss():
        out = main_output(new(*args, **kwargs))
        if name in LM:  # next-token cross-entropy
            ids = kwargs["input_ids"]
            return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        return F.mse_loss(out, target)  # regression on the hidden states

    return loss


def _hc_params(new):
    params = [(k, p) for k, p in new.named_parameters() if k.startswith("hc.")]
    assert params, "no connection parameters under hc."
    return params


NOISE = 1e-5  # a gradient below NOISE * (largest hc gradient) is fp32 rounding, not a signal


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_one_backward_reaches_every_connection_parameter(name, variant, dynamic, fresh_rewritten):
    r = fresh_rewritten(name, variant, dynamic)
    new = r.new
    new.train()
    new.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout
    _loss_fn(name, new)().backward()
    params = _hc_params(new)
    assert all(p.requires_grad for _, p in params)
    no_grad = [k for k, p in params if p.grad is None]
    zero = [k for k, p in params if p.grad is not None and not bool(p.grad.abs().sum() > 0)]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    top = max(p.grad.abs().max().item() for _, p in params)
    noise = [k for k, p in params if p.grad.abs().max().item() < NOISE * top]
    assert zero == [] and noise == []
    # the original parameters of the blocks train too
    blocks = [k for k, p in new.named_parameters() if not k.startswith("hc.") and ".0." in k]
    assert blocks and all(new.get_parameter(k).grad is not None for k in blocks)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_mhc_every_kind_of_parameter_learns_from_the_first_step(dynamic, fresh_rewritten):
    """mHC: b_pre, b_post, b_res (at every site that has one) and, dynamic, phi and alpha all get a
    gradient well above rounding noise on the first backward pass, although the model is exact at init
    (the copies start apart and H_pre is tilted; docs/design.md)."""
    new = fresh_rewritten("gpt2", "mhc", dynamic).new
    new.zero_grad(set_to_none=True)
    _loss_fn("gpt2", new)().backward()
    params = _hc_params(new)
    top = max(p.grad.abs().max().item() for _, p in params)
    kinds = {k.rsplit(".", 1)[1]: 0 for k, _ in params}
    for k, p in params:
        assert p.grad.abs().max().item() >= 1e-4 * top, k  # a real signal (rounding is < 1e-6)
        kinds[k.rsplit(".", 1)[1]] += 1
    expected = {"b_pre", "b_post", "b_res"} | ({"phi", "alpha"} if dynamic else set())
    assert set(kinds) == expected
    assert kinds["b_res"] == kinds["b_pre"] - 1  # every site but the last of the stream mixes


def test_mhc_n2_b_res_learns_once_h_pre_moves():
    """n = 2 is the one case where no exact init can give H_res a first gradient (the pair-difference
    span is the whole zero-sum space, so H_pre must start uniform); once a step has tilted H_pre, the
    next backward passes reach b_res."""
    import hc_rewrite

    model = ZOO["gpt2"].build()
    args, kwargs = inputs("gpt2", 0, batch=2, seq=8)
    new = hc_rewrite.rewrite(model, args, kwargs, variant="mhc", n=2, dynamic=False, form="graph")
    opt = torch.optim.AdamW(new.parameters(), lr=3e-3)
    rel = []
    for _ in range(3):
        new.zero_grad(set_to_none=True)
        _loss_fn("gpt2", new)().backward()
        params = _hc_params(new)
        top = max(p.grad.abs().max().item() for _, p in params)
        rel.append(min(p.grad.abs().max().item() / top for k, p in params if k.endswith(".b_res")))
        opt.step()
    assert rel[0] < NOISE < max(rel[1:])  # zero at init, a signal once H_pre has moved


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_optimizer_steps_lower_the_loss(name, variant, dynamic, opt, fresh_rewritten):
    r = fresh_rewritten(name, variant, dynamic)
    _train_and_check(name, r, opt)


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_optimizer_steps_lower_the_loss_more_models(name, fresh_rewritten):
    _train_and_check(name, fresh_rewritten(name, "mhc", True), "adamw")


def _train_and_check(name, r, opt, steps=5):
    new = r.new
    loss = _loss_fn(name, new)
    new.eval()  # deterministic loss (no dropout) so that the comparison is exact
    with torch.no_grad():
        before = loss().item()
    start = {k: p.detach().clone() for k, p in new.named_parameters()}
    if opt == "adamw":
        optimizer = torch.optim.AdamW(new.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.SGD(new.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    with torch.no_grad():
        after = loss().item()
    assert after < before - 0.05 * abs(before), (before, losses, after)
    assert all(torch.isfinite(torch.tensor(losses)))
    if opt == "adamw":  # the connection parameters are trained, not only the original ones
        moved = [k for k, p in new.named_parameters() if k.startswith("hc.") and not torch.equal(p, start[k])]
        assert moved == [k for k, _ in _hc_params(new)]
    # training the rewritten module never touches the caller's model
    for k, v in r.model.state_dict().items():
        assert torch.equal(v, r.before[k]), k
