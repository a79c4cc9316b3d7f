"""Helpers shared by the test modules (plain functions and constants; the fixtures are in conftest)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from hc_rewrite import variants
from hc_rewrite.zoo import ZOO

CAPTURE_SEED = 0  # generator seed of the example inputs given to rewrite()
FRESH_SEED = 1234  # generator seed of the inputs the tests compare on (never seen at capture)
BATCH, SEQ = 2, 8

VARIANTS = variants.NAMES
EQUIV_MODELS = ("gpt2", "llama", "bert", "vit", "minilm")


# ----------------------------------------------------------------------------- helpers
def main_output(out) -> torch.Tensor:
    """The main tensor of a model output: a tensor, or the first entry of a tuple / HF ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|a|."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / a.abs().max()).item()


def inputs(name: str, seed: int, batch: int = BATCH, seq: int = SEQ):
    return ZOO[name].inputs(batch, seq, torch.Generator().manual_seed(seed))


def hc_targets(gm) -> list:
    """Names of the ``torch.ops.hc_rewrite.*`` ops called in a graph module, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("hc_rewrite."):
            out.append(str(node.target).split(".")[1])
    return out


def analysed(model: nn.Module, args, until: str | None = None):
    """``model(*args)`` captured and run through the analysis passes of the pipeline
    (:data:`hc_rewrite.passes.pipeline.ANALYSIS`), all of them or those before the pass ``until``; the graph is
    recompiled, as the pipeline's users do. Returns the :class:`~hc_rewrite.passes.pipeline.PassContext`
    (``.gm``, ``.sites``, ``.streams``)."""
    from hc_rewrite.capture import capture
    from hc_rewrite.passes.pipeline import ANALYSIS, PassContext

    ctx = PassContext(capture(model, args).gm)
    (ANALYSIS if until is None else ANALYSIS.until(until))(ctx)
    ctx.gm.recompile()
    return ctx


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def moved_copy(new, seed: int = 0):
    """A copy of the rewritten ``new`` whose connection parameters have moved off their init by ``0.05 * N(0, 1)``
    (so equality with eager, or a difference from the original, is not luck)."""
    out = copy.deepcopy(new)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.hc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def assert_pairwise_cover(cases, levels) -> None:
    """Every pair of values of any two factors (``levels[i]``: the values of factor ``i``, position ``i`` of each
    case) occurs in some case of ``cases``: what a pairwise covering array stands for."""
    for i in range(len(levels)):
        for j in range(i + 1, len(levels)):
            seen = {(case[i], case[j]) for case in cases}
            assert seen == {(a, b) for a in levels[i] for b in levels[j]}, (i, j)


class CountingBackend:
    """A ``torch.compile`` backend counting the graphs dynamo hands it; runs them eagerly, or through the named
    ``backend``. With ``fullgraph=True`` a graph break raises, so ``graphs == 1`` after one call is what
    ``torch._dynamo.explain`` would report as 1 graph and 0 breaks, for one trace instead of two."""

    def __init__(self, backend: str | None = None):
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend(backend) if backend else None

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs) if self.inner else gm.forward
