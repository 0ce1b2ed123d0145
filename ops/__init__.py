"""Custom ops of fxpasses, in the ``torch.ops.fxp`` namespace.

Importing this package registers every op once per process (Python's import cache makes it idempotent).
Each op has a schema, a fake (meta) implementation for tracing, and an eager implementation in plain torch
that runs on CPU and CUDA. This package depends on nothing else of ours: ``patterns`` and ``fxpasses`` build
on it, never the other way round.
"""
from fxpasses.ops import attention, elementwise, linear, norms, p2p, quant  # noqa: F401  (registration happens on import)
from fxpasses.ops.library import NAMESPACE, SIDE_EFFECT_OPS, SUPPORTED_FLOAT_DTYPES, TOKEN_PADDING
from fxpasses.ops.quant import FP8_DTYPE, FP8_MAX


def _register_gpu_kernels() -> bool:
    """Triton kernels replace the reference implementations for CUDA tensors, where Triton is installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from fxpasses.ops import triton_allreduce, triton_attention, triton_elementwise, triton_kernels, triton_linear

    triton_kernels.register()
    triton_attention.register()
    triton_elementwise.register()
    triton_linear.register()
    triton_allreduce.register()
    return True


GPU_KERNELS = _register_gpu_kernels()

__all__ = ["GPU_KERNELS", "NAMESPACE", "SIDE_EFFECT_OPS", "SUPPORTED_FLOAT_DTYPES", "TOKEN_PADDING", "FP8_DTYPE", "FP8_MAX"]
