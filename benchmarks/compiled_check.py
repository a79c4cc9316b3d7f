"""Every compiled benchmark row proves it runs its own model: its compiled output against eager, parameters moved.

A rewritten model shares its classes, and so its compiled code objects, with the original: a benchmark that compiles
the plain stack first once timed the original's graph as if it were the rewritten one (issue 20). At init both
functions are equal, so the check first moves every parameter off its value (the connection parameters included),
runs the compiled model and its eager module on the same input, and puts the parameters back.

    check_compiled(compiled, eager_module, x)      # raises CompiledMismatch naming the error
"""
from __future__ import annotations

import torch
from torch import nn


class CompiledMismatch(AssertionError):
    """A compiled benchmark row does not compute its eager model's function."""


def check_compiled(compiled, eager: nn.Module, x: torch.Tensor, *, tol: float | None = None, seed: int = 0,
                   autocast=None) -> float:
    """Relative error of ``compiled(x)`` against ``eager(x)`` with every parameter of ``eager`` moved by
    ``0.05 * N(0, 1)``; raises :class:`CompiledMismatch` above ``tol`` (fp32 1e-4, bf16 autocast 3e-2). Grad mode
    stays on, so the graph checked is the training graph the benchmark times. Returns the error."""
    params = list(eager.parameters())
    saved = [p.detach().clone() for p in params]
    g = torch.Generator(device="cpu").manual_seed(seed)
    autocast = autocast or torch.autocast(x.device.type, enabled=False)
    if tol is None:
        tol = 3e-2 if autocast.fast_dtype in (torch.bfloat16, torch.float16) and autocast._enabled else 1e-4
    try:
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
        with autocast:
            ref = eager(x).detach().float()
            got = compiled(x).detach().float()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err <= tol:
        raise CompiledMismatch(f"the compiled model differs from its eager module by {err:.2e} (rel., tol {tol:.0e}) "
                               "with its parameters moved: it runs another model's compiled code, or a wrong one")
    return err
