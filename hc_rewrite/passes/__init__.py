"""Graph passes, one per file. Each is a plain function over an ``fx.GraphModule``; the order they run in is
:mod:`.pipeline`."""
from .remove_metadata_asserts import remove_metadata_asserts
from .restore_dropout_modules import restore_dropout_modules
from .restore_batch_norm_modules import restore_batch_norm_modules
from .find_residual_sites import find_residual_sites
from .infer_feature_axes import infer_feature_axes
from .group_residual_streams import group_residual_streams
from .insert_hyper_connections import insert_hyper_connections
from .place_sites_on_modules import place_sites_on_modules
from .fuse_stream_ops import fuse_stream_ops
from .lower_stream_ops import lower_stream_ops
from .decompose_stream_ops import decompose_stream_ops

__all__ = [
    "remove_metadata_asserts",
    "restore_dropout_modules",
    "restore_batch_norm_modules",
    "find_residual_sites",
    "infer_feature_axes",
    "group_residual_streams",
    "insert_hyper_connections",
    "place_sites_on_modules",
    "fuse_stream_ops",
    "lower_stream_ops",
    "decompose_stream_ops",
]
