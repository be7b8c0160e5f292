"""The fused noisy weight on CUDA: ``W + Z ⊙ s_row`` in one pass over ``W``, with ``Z ~ N(0, 1)``
from Triton's counter-based Philox generator keyed by (seed, element index). Nothing is stored
between the forward and the backward: the backward calls the same kernel with the same seed and
gets the same noisy weight, bit for bit (the floor of full-model random noise is a
few passes over the weights at memory bandwidth).

Triton ships with the CUDA builds of PyTorch; without it (or on CPU) the callers fall back to
``torch.randn`` with a seeded generator, which draws from the same distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # pragma: no cover - CUDA builds only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds
    triton = None

#: Offsets are int32 inside the kernel; larger tensors take the torch path.
MAX_NUMEL = 2**31 - 1
BLOCK = 2048


def supported(weight: Tensor) -> bool:
    """True when the fused kernel can build this weight's noisy copy."""
    return (triton is not None and weight.is_cuda and weight.is_contiguous() and weight.dim() >= 1
            and 0 < weight.numel() <= MAX_NUMEL)


if triton is not None:  # pragma: no cover - CUDA builds only

    @triton.jit
    def _noisy_weight_kernel(w_ptr, scale_ptr, out_ptr, numel, cols, seed, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + offsets // cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.randn(seed, offsets)
        tl.store(out_ptr + offsets, (w + z * s).to(out_ptr.dtype.element_ty), mask=mask)


def noisy_weight(weight: Tensor, scale: Tensor, seed: int, dtype: torch.dtype) -> Tensor:  # pragma: no cover
    """``W + Z ⊙ scale[row]`` in ``dtype``, rows = ``weight.shape[0]``, ``scale`` one value per row.

    The seed is folded into [2⁶², 2⁶³) so that Triton always passes it as a 64-bit integer (one
    compiled kernel for every seed; Philox takes the 64-bit key as two 32-bit words)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scale = scale.reshape(-1).to(torch.float32).contiguous()
    numel = weight.numel()
    grid = (triton.cdiv(numel, BLOCK),)
    _noisy_weight_kernel[grid](weight, scale, out, numel, numel // weight.shape[0],
                               (int(seed) & (2**62 - 1)) | 2**62, BLOCK=BLOCK, num_warps=8)
    return out


def row_norm_supported(weight: Tensor, rank: int) -> bool:
    """True when :func:`merged_row_norms` can run on this base weight (2-D, CUDA, contiguous)."""
    return supported(weight) and weight.dim() == 2 and rank <= 128


if triton is not None:  # pragma: no cover - CUDA builds only

    @triton.jit
    def _merged_row_norms_kernel(w_ptr, b_ptr, a_ptr, out_ptr, rows, cols, rank, s, factor,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, R)
        row_ok = rm < rows
        b = tl.load(b_ptr + rm[:, None] * rank + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < rank),
                    other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, cols, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            col_ok = rn < cols
            w = tl.load(w_ptr + rm[:, None] * cols + rn[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * cols + rn[None, :], mask=(rr[:, None] < rank) & col_ok[None, :],
                        other=0.0).to(tl.float32)
            merged = w + s * tl.dot(b, a, input_precision="ieee")
            acc += tl.sum(merged * merged, axis=1)
        tl.store(out_ptr + rm, tl.sqrt(acc) * factor, mask=row_ok)


def merged_row_norms(weight: Tensor, b: Tensor, a: Tensor, s: float, factor: float) -> Tensor:  # pragma: no cover
    """``factor·‖(W + s·B·A)_{i,:}‖₂`` per row in float32, in one pass over ``W`` (``W``: out × in,
    ``B``: out × r, ``A``: r × in, ``s`` the LoRA scaling): the merged weight is formed tile by tile
    in registers (an fp32 product of the factors) and never written."""
    rows, cols = weight.shape
    rank = a.shape[0]
    out = torch.empty(rows, dtype=torch.float32, device=weight.device)
    b, a = b.contiguous(), a.contiguous()
    block_m = 32
    _merged_row_norms_kernel[(triton.cdiv(rows, block_m),)](
        weight, b, a, out, rows, cols, rank, float(s), float(factor), BLOCK_M=block_m, BLOCK_N=128,
        R=max(16, triton.next_power_of_2(rank)), num_warps=4)
    return out
