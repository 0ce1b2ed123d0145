"""fxpasses: a pure FX pass pipeline for torch.compile on tensor- and pipeline-parallel models.

Importing fxpasses registers the ``torch.ops.fxp`` custom ops.
"""
import ops  # noqa: F401  (registers torch.ops.fxp.*)

from fxpasses.mapping import Mapping, ProcessGroups, init_process_groups

__all__ = ["Mapping", "ProcessGroups", "init_process_groups"]
__version__ = "0.1.0"
