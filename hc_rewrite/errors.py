"""Errors raised by hc_rewrite. All derive from :class:`HCRewriteError` (and the built-in they refine)."""


class HCRewriteError(Exception):
    """Base class of every hc_rewrite error."""


class SpecError(HCRewriteError, ValueError):
    """The connection spec does not fit (unknown variant, ``n < 1``, ``d % m != 0`` ...)."""


class CaptureError(HCRewriteError, RuntimeError):
    """The model could not be captured as an FX graph; the message lists every capture path tried."""


class NotAModuleError(CaptureError, TypeError):
    """``rewrite`` / ``report`` / ``capture`` were given something that is not an ``nn.Module``."""


class NoResidualStreamError(HCRewriteError, ValueError):
    """No residual stream could be rewritten. ``.report`` holds what was found and why it was refused."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class AlreadyHyperConnectedError(NoResidualStreamError):
    """The model's residual streams already are hyper-connections (``.report.existing`` says where)."""


class BackendError(HCRewriteError, RuntimeError):
    """The ``hc_rewrite`` torch.compile backend was used in a way it cannot honour."""


class StructureError(HCRewriteError, RuntimeError):
    """The structure-preserving form could not reproduce the original on the example call."""
