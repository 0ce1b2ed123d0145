"""fxpasses: a pure FX pass pipeline for torch.compile on tensor- and pipeline-parallel models.

Importing fxpasses registers the ``torch.ops.fxp`` custom ops and the ``"fxpasses"`` torch.compile backend.
"""
from pathlib import Path as _Path

# Installed, ops/ and patterns/ live inside this package (setuptools' package-dir). Run from a source checkout
# without installing (``PYTHONPATH=.``, as on the GPU machine), they are this folder's siblings: look there too.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "ops").is_dir() and (_checkout / "ops" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (a package's __path__)

from fxpasses import ops  # noqa: E402, F401  (registers torch.ops.fxp.*)

from fxpasses.backend import Backend
from fxpasses.canonical import canonicalize
from fxpasses.functionalization import defunctionalize, functionalize
from fxpasses.mapping import Mapping, ProcessGroups, init_process_groups
from fxpasses.pass_manager import PassError, PassManager, Stage
from fxpasses.precompile import Precompiled, PrecompileStatus, precompile
from fxpasses.passes import PassContext, PassResult, PipelineConfig
from fxpasses.report import PassRecord, Report
from fxpasses.rewrite import rewrite
from fxpasses.tokens import TokenDim, find_token_dim, mark_token_dim
from fxpasses.verifier import VerificationError

__all__ = [
    "Backend", "Mapping", "canonicalize", "PassContext", "PassError", "PassManager", "PassRecord", "PassResult", "PipelineConfig",
    "Precompiled", "PrecompileStatus", "ProcessGroups", "Report", "Stage", "TokenDim", "VerificationError", "defunctionalize", "find_token_dim",
    "functionalize", "init_process_groups", "mark_token_dim", "precompile", "rewrite",
]
__version__ = "0.1.0"
