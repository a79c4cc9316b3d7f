"""hc_rewrite: rewrite the residual streams of any PyTorch model into mHC, Frac or Hyper-Connections.

>>> import hc_rewrite
>>> new_model = hc_rewrite.rewrite(model, (input_ids,), variant="mhc", n=4)   # doctest: +SKIP
>>> print(new_model.hc_report)                                                 # doctest: +SKIP
"""
from .api import check, report, rewrite
from .structured import (Plan, compile_stream_ops, connection_keys, from_pretrained, init_connections, rebuild, strip,
                         to_graph)


def export_onnx(*args, **kwargs):
    """See :func:`hc_rewrite.onnx_export.export_onnx` (imported on first use: it needs the onnx extra)."""
    from .onnx_export import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


from .errors import (AlreadyHyperConnectedError, CaptureError, HCRewriteError, NoResidualStreamError, SpecError,
                     StructureError)
from .ops import ops, reference
from .report import RewriteReport
from .spec import HCSpec

__version__ = "0.1.0"

__all__ = [
    "rewrite", "report", "RewriteReport", "HCSpec", "HCRewriteError", "SpecError", "CaptureError",
    "NoResidualStreamError", "AlreadyHyperConnectedError", "StructureError", "ops", "reference", "__version__", "from_pretrained", "rebuild",
    "Plan", "strip", "to_graph", "export_onnx", "compile_stream_ops", "init_connections", "connection_keys",
    "check",
]
