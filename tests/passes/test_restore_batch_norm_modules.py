"""restore_batch_norm_modules: export's functional batch norm (``training=False`` baked in) becomes a real
``nn.BatchNorm*d`` at the original module path holding the same tensors, so ``.train()`` / ``.eval()`` act as on
the original model (batch statistics, running-statistics updates) and the state_dict keys do not change."""
import copy

import pytest
import torch
import torch.nn as nn

from hc_rewrite.passes import restore_batch_norm_modules

from ..helpers import analysed

BN_TARGETS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default}


class ConvBNNet(nn.Module):
    """A 2-D batch norm after a conv, a 1-D one inside a Sequential (``seq.1``) on a ``[B, C, L]`` tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.seq = nn.Sequential(nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.seq(h.flatten(2))


def _model():
    torch.manual_seed(0)
    model = ConvBNNet()
    with torch.no_grad():  # running statistics away from (0, 1), so eval and train outputs differ
        for bn in (model.bn, model.seq[1]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model.eval()


def _bn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_TARGETS]


def _module_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]


def test_functional_batch_norm_becomes_modules_at_the_original_paths():
    model = _model()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    gm = analysed(model, (x,), until="restore_batch_norm_modules").gm
    keys = list(gm.state_dict())
    tensors = {k: v.data_ptr() for k, v in gm.state_dict().items()}
    names = [n.name for n in _bn_nodes(gm)]
    assert len(names) == 2 and not _module_calls(gm)

    assert restore_batch_norm_modules(gm) == 2

    assert _bn_nodes(gm) == []
    calls = _module_calls(gm)
    assert [(n.name, n.target) for n in calls] == list(zip(names, ["bn", "seq.1"]))  # captured names kept
    assert type(gm.get_submodule("bn")) is nn.BatchNorm2d and type(gm.get_submodule("seq.1")) is nn.BatchNorm1d
    assert list(gm.state_dict()) == keys  # same keys ...
    assert {k: v.data_ptr() for k, v in gm.state_dict().items()} == tensors  # ... holding the same tensors
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]  # no dangling reads
    gm.graph.lint()
    assert restore_batch_norm_modules(gm) == 0  # nothing left to restore


def test_train_and_eval_follow_the_original():
    model = _model()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    gm = analysed(model, (x,)).gm  # the whole analysis, as rewrite() runs it
    assert not _bn_nodes(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x2), model(x2), rtol=0, atol=0)  # eval: running statistics
        ref = copy.deepcopy(model).train()
        gm.train()
        out, want = gm(x2), ref(x2)  # train: batch statistics, and the running ones move
    assert not torch.allclose(want, model(x2))  # (the two modes really differ here)
    torch.testing.assert_close(out, want)
    for path in ("bn", "seq.1"):
        mine, theirs = gm.get_submodule(path), ref.get_submodule(path)
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        torch.testing.assert_close(mine.running_var, theirs.running_var)
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    assert not torch.equal(gm.get_submodule("bn").running_mean, model.bn.running_mean)  # the capture is a copy


@pytest.mark.parametrize("recompile", [True, False])
def test_recompile_flag(recompile):
    """In a pipeline the pass leaves recompiling to its user (``recompile=False``): the code is then stale."""
    model = _model()
    x = torch.randn(2, 3, 5, 5)
    gm = analysed(model, (x,), until="restore_batch_norm_modules").gm
    code = gm.code
    restore_batch_norm_modules(gm, recompile=recompile)
    assert (gm.code != code) == recompile
