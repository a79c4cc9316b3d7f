"""The same pre-norm stack as :class:`benchmarks.e2e.GPTStack`, with its residuals written by hand with the PyPI
package ``hyper-connections`` (lucidrains, 0.4.11; the optional ``bench`` extra), for side-by-side timings.

Each branch (``norm -> attention``, ``norm -> MLP``) is wrapped by one connection of the package, the stream is
widened once before the first block and reduced after the last, as its README shows:

* ``pypi-mhc``: ``ManifoldConstrainedHyperConnections``, 4 streams (sigmoid gates, Sinkhorn ``H_res``);
* ``pypi-frac``: ``HyperConnections`` with 1 stream and ``num_fracs=4`` (Frac-connections);
* ``pypi-hc``: ``HyperConnections``, 4 streams (dynamic, tanh).

The package always computes the dynamic (input-dependent) coefficients, as the ``hc_rewrite`` rows do by
default. Its streams live in the batch dim (``[(b s), t, d]``) and are reduced by a sum. These rows are for
timing: only the package's HC starts as the residual stack's function (tested), its mHC (sigmoid gates) and its
frac (the static matrix as the package initialises it) do not.
"""
from __future__ import annotations

from torch import nn

#: benchmark row -> (package module, streams, fractions)
KINDS = {
    "pypi-mhc": ("manifold_constrained_hyper_connections", 4, 1),
    "pypi-frac": ("hyper_connections", 1, 4),
    "pypi-hc": ("hyper_connections", 4, 1),
}


def available() -> bool:
    """Whether the package is installed (``pip install -e ".[bench]"``)."""
    try:
        import hyper_connections  # noqa: F401
    except ImportError:
        return False
    return True


class _Branch(nn.Module):
    def __init__(self, norm, body):
        super().__init__()
        self.norm, self.body = norm, body

    def forward(self, x):
        return self.body(self.norm(x))


class PyPIBlock(nn.Module):
    def __init__(self, block, init_hc, index):
        super().__init__()
        self.attn = init_hc(branch=_Branch(block.norm1, block.attn), layer_index=2 * index)
        self.mlp = init_hc(branch=_Branch(block.norm2, block.mlp), layer_index=2 * index + 1)

    def forward(self, x):
        return self.mlp(self.attn(x))


class PyPIStack(nn.Module):
    """``stack``'s layers (shared weights: same init as the residual row) behind the package's connections."""

    def __init__(self, stack, d: int, kind: str):
        super().__init__()
        import importlib

        module, streams, fracs = KINDS[kind]
        pkg = importlib.import_module(f"hyper_connections.{module}")
        init_hc, self.expand, self.reduce = pkg.get_init_and_expand_reduce_stream_functions(
            streams, num_fracs=fracs, dim=d)
        self.blocks = nn.ModuleList(PyPIBlock(b, init_hc, i) for i, b in enumerate(stack.blocks))
        self.norm = stack.norm

    def forward(self, x):
        x = self.expand(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(self.reduce(x))
