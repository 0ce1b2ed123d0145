"""Rounding a float32 value to bf16/fp16 precision inside a Triton kernel, kept as float32.

Eager torch rounds every intermediate to the tensor's dtype (``x * cos`` in bf16 is rounded before the add). A
kernel that reproduces that with ``v.to(tl.bfloat16).to(tl.float32)`` is not safe: the compiler folded that round
trip away (measured on an H200 with Triton 3.6: a quarter of RoPE outputs came out one bf16 step off eager). These
helpers round with integer arithmetic on the bits instead, which nothing folds: round to nearest, ties to even.
NaN passes through unchanged: the rounding add would carry NVIDIA's NaN (0x7FFFFFFF) into the sign bit and make it
-0.0, so a row holding a NaN came out as zeros on CUDA where eager and the CPU op give NaN. An fp16 value past the
largest finite one rounds to inf, as the cast does. Known difference: a negative fp16 value that rounds to zero
(and -0.0 itself) comes out as +0.0, not -0.0 (equal as numbers; only the sign bit differs).
"""
import triton
import triton.language as tl


@triton.jit
def round_as(x, DTYPE: tl.constexpr):
    """``x`` (float32) rounded to the precision of ``DTYPE`` (bf16 or fp16; float32 returns ``x``)."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, b.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        b = x.to(tl.uint32, bitcast=True)
        normal = ((b + 0xFFF + ((b >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
        # below 2**-14 fp16 is subnormal, with a fixed step of 2**-24: adding 0.75 puts x where float32's step
        # is 2**-24, so the add rounds it there (ties to even) and the subtraction is exact
        subnormal = (x + 0.75) - 0.75
        # past fp16's largest finite value (65504) the bit rounding gives 65536 or more, still finite in float32:
        # eager's cast gives inf there, and so must we (an overflowing fp16 sum is inf in eager and NCCL alike)
        normal = tl.where(tl.abs(normal) > 65504.0, normal * float("inf"), normal)
        return tl.where(x != x, x, tl.where(tl.abs(x) < 6.103515625e-05, subnormal, normal))
    else:
        return x
