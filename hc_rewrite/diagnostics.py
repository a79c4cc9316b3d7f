"""What the connections of a rewritten model are doing: the stability figures of the mHC paper, for one batch.

Per site: the forward gain (largest absolute row sum) and backward gain (largest absolute column sum) of ``H_res``
(stored ``[out, in]``: the forward gain bounds how much the site can amplify the stream, the backward gain the
gradient); the same for the **composite** mapping of the stream from its start to the site (the product of the
``H_res`` so far: the paper's "Amax gain magnitude", thousands for unconstrained HC in their runs, about 1 for mHC,
whose ``H_res`` is doubly stochastic); the ranges of ``H_pre`` and ``H_post``; mHC's gates ``alpha``. Dynamic
connections have coefficients per token: each figure is given as its maximum and its mean over the batch's tokens.

    stats = hc_rewrite.diagnostics.site_stats(new, input_ids)      # one row per site, in stream order
    logs = hc_rewrite.diagnostics.summary(stats)                   # flat scalars for any logger
    hc_rewrite.diagnostics.plot([(step, stats), ...], "gains.png") # gain vs layer, gain vs step

:class:`DiagnosticsCallback` logs :func:`summary` through the ``transformers`` Trainer's own reporters (TensorBoard,
W&B, ...). The coefficients are recomputed from the widened stream each site read, with the variant's own
coefficient op (:meth:`hc_rewrite.variants.base.Variant.coefficients`), eagerly and without grad.
"""
from __future__ import annotations

import torch

from .stream_value import RECORD
from .variants import eager


def _gains(m: torch.Tensor):
    """``(forward, backward)`` gains of ``[T, n, n]`` matrices, per matrix."""
    a = m.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def _as_tokens(h: torch.Tensor, trailing: int) -> torch.Tensor:
    """``[..., *trailing dims]`` as ``[tokens, *trailing dims]`` (a static coefficient is one token)."""
    return h.reshape(-1, *h.shape[h.dim() - trailing:]).double()


def site_stats(model, *args, **kwargs) -> list:
    """Run ``model(*args, **kwargs)`` once (no grad, the model's mode as it is) and return one dict per site entry
    call, in the order the sites ran: ``site``, ``stream``, ``index``; ``fwd_gain`` / ``bwd_gain`` of ``H_res`` and
    ``composite_fwd_gain`` / ``composite_bwd_gain`` (each ``{"max", "mean"}`` over tokens; ``None`` at a site
    without ``H_res``, mHC's last); ``h_pre`` / ``h_post`` (``{"min", "max"}``); ``alpha`` (mHC's gates, else
    ``None``)."""
    if getattr(model, "hc_plan", None) is None:
        raise ValueError("site_stats: the model was not rewritten by hc_rewrite (form='module')")
    with torch.no_grad(), RECORD:
        model(*args, **kwargs)
    calls = list(RECORD.calls)
    if not calls:
        raise ValueError("site_stats: no site ran on this call (is the input one the rewritten model streams?)")
    composite: dict = {}
    rows = []
    for hook, w in calls:
        info = hook.info
        h_pre, h_post, h_res = info.variant.coefficients(eager, w, hook.params.coeff_args(), info.sinkhorn_iters)
        row = {"site": hook.name, "stream": info.id, "index": hook.index, "variant": info.variant.name,
               "h_pre": {"min": float(h_pre.min()), "max": float(h_pre.max())},
               "h_post": {"min": float(h_post.min()), "max": float(h_post.max())},
               "alpha": ([float(a) for a in hook.params.alpha] if getattr(hook.params, "alpha", None) is not None
                         else None)}
        if h_res is None or h_res.numel() == 0:
            row.update(fwd_gain=None, bwd_gain=None, composite_fwd_gain=None, composite_bwd_gain=None)
        else:
            r = _as_tokens(h_res, 2)
            prev = composite.get(info.id)
            comp = r if prev is None else r @ prev
            composite[info.id] = comp
            for key, m in (("", r), ("composite_", comp)):
                fwd, bwd = _gains(m)
                row[f"{key}fwd_gain"] = {"max": float(fwd.max()), "mean": float(fwd.mean())}
                row[f"{key}bwd_gain"] = {"max": float(bwd.max()), "mean": float(bwd.mean())}
        rows.append(row)
    return rows


def summary(stats: list, prefix: str = "hc/") -> dict:
    """Flat scalars of :func:`site_stats` for a logger: the largest gains (per site and composite, forward and
    backward) over all sites, and the extreme ``H_pre`` / ``H_post`` values."""
    out = {}
    for key in ("fwd_gain", "bwd_gain", "composite_fwd_gain", "composite_bwd_gain"):
        values = [r[key]["max"] for r in stats if r[key] is not None]
        if values:
            out[f"{prefix}max_{key}"] = max(values)
    for key in ("h_pre", "h_post"):
        out[f"{prefix}{key}_min"] = min(r[key]["min"] for r in stats)
        out[f"{prefix}{key}_max"] = max(r[key]["max"] for r in stats)
    return out


def plot(history: list, path: str) -> str:
    """Two panels from ``history`` = ``[(step, site_stats(...)), ...]``: the composite forward gain against the
    site (layer) for the first and last step, and the largest composite gain (forward, backward) against the step;
    written to ``path`` (PNG). Needs matplotlib (``pip install -e ".[plots]"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_layer, by_step) = plt.subplots(1, 2, figsize=(10, 4))
    for step, stats in (history[0], history[-1]) if len(history) > 1 else history[:1]:
        rows = [r for r in stats if r["composite_fwd_gain"] is not None]
        by_layer.plot(range(len(rows)), [r["composite_fwd_gain"]["max"] for r in rows], marker="o",
                      label=f"step {step}")
    by_layer.set(xlabel="site (stream order)", ylabel="composite forward gain (max over tokens)", yscale="log",
                 title="gain vs layer")
    by_layer.legend()
    steps = [s for s, _ in history]
    for key, label in (("composite_fwd_gain", "forward"), ("composite_bwd_gain", "backward")):
        by_step.plot(steps, [max((r[key]["max"] for r in st if r[key] is not None), default=float("nan"))
                             for _, st in history], marker=".", label=label)
    by_step.set(xlabel="step", ylabel="largest composite gain", yscale="log", title="gain vs step")
    by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


try:  # a TrainerCallback where transformers is installed (the callback is for its Trainer)
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a test dependency
    _CallbackBase = object


class DiagnosticsCallback(_CallbackBase):
    """A ``transformers`` ``TrainerCallback``: at every log step it adds :func:`summary` of a fixed ``batch`` (a dict
    of model inputs) to the Trainer's logs, so that its reporters (TensorBoard, W&B, ...) record the gains, and keeps
    ``history`` (``[(step, site_stats), ...]``) for :func:`plot`. The Trainer calls its own reporters before the
    callbacks it is given: :meth:`install` puts this one first."""

    def __init__(self, batch: dict):
        self.batch, self.history = batch, []

    @classmethod
    def install(cls, trainer, batch: dict) -> "DiagnosticsCallback":
        cb = cls(batch)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or logs is None:
            return
        model = getattr(model, "module", model)
        device = next(model.parameters()).device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.batch.items()}
        stats = site_stats(model, **batch)
        self.history.append((state.global_step, stats))
        logs.update(summary(stats))
