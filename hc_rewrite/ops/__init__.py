"""Stream ops: reference math (:mod:`.reference`) and their ``torch.ops.hc_rewrite`` registration."""
from . import reference
from .library import ops
from .. import variants  # noqa: E402,F401  (registers the operators of every variant)

__all__ = ["reference", "ops"]
