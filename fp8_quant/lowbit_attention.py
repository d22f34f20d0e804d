"""8-bit attention for FP8 GPUs: the pack's own fused forward kernel (Triton), its quantization pass and an
emulation of its numerics in plain torch.

Why two formats for the first product: e4m3 rounds every value with about 2.4% relative error whatever its scale,
while 8-bit integers with one scale per block of smoothed (near-Gaussian) values round with about 1%; on Hopper
and Ada the int8 and fp8 tensor cores run at the same rate, so ``qk="int8"`` (SageAttention's choice) costs no speed
for a lower error, and ``qk="fp8"`` is kept for comparison. The second product is always e4m3 (P and V).

Numerics (``emulate`` computes the same thing in float32, up to the online softmax's running maximum):
- K is smoothed: its mean over tokens is subtracted per head and channel. Every logit of a query row moves by the
  same amount (q·mean), so the softmax is unchanged, and what is left is centred, with a smaller range.
- Q in groups of ``Q_GROUP`` tokens and K in groups of ``K_GROUP`` tokens, each group with one scale (its amax
  over the group's tokens and the head's channels); the softmax scale and log2(e) are folded into Q's.
- The online softmax runs in float32 (exp2). P (in [0, 1]) is scaled by 448 and cast to e4m3. V is smoothed as K
  is (its mean over tokens per head and channel subtracted, and added back to the output: the softmax weights of a
  row sum to one), then has one scale per head and channel (amax over tokens) and is stored transposed, so that both
  operands of P·V are K-major as Hopper's fp8 MMA needs them. Smoothing V matters twice: its rounding follows the
  centred values, and the mean no longer rides on the sum of rounded weights over thousands of keys.
- P·V accumulates through the tensor cores' float32 accumulator, chained over the key blocks. Hopper's fp8 MMA
  keeps only about 13 bits of that sum; a sum of same-sign terms (an unsmoothed V's mean) over thousands of keys
  then comes out short (``bench/lowbit_attention_accumulation.py`` models it), while smoothed V's sums stay small
  and keep their terms: promoting each block's product to float32 changed nothing measurable after smoothing.

Inputs are ``[B, H, N, D]`` tensors of any strides (ComfyUI's ``[B, N, H*D]`` seen through a view); the output is
written into the layout the caller gives (``out``), so ComfyUI's ``[B, N, H*D]`` costs no extra copy.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; the emulation below needs none of it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds
    triton = None
    tl = None

Q_GROUP = 128  # tokens per Q scale
K_GROUP = 64  # tokens per K scale
TOKEN_PAD = 128  # Q and K are padded to a multiple of this many tokens in their 8-bit buffers
P_SCALE = 448.0  # P in [0, 1] times this fills e4m3's range
LOG2E = 1.4426950408889634
QK_FORMATS = ("int8", "fp8")
# The second product: e4m3 P and V (the fp8 tensor cores' rate), or fp16 (SageAttention 1's choice: half that rate
# for the second product, and none of e4m3's rounding of P and V).
PV_FORMATS = ("fp8", "fp16")
_QMAX = {"int8": 127.0, "fp8": 448.0}
_AMAX_FLOOR = 1e-12


def head_dim_supported(head_dim: int) -> bool:
    return head_dim in (64, 128)


# ---------------------------------------------------------------------------------------------------------------
# Emulation (any device): the kernel's rounding, with the exact softmax


def _round_groups(x: torch.Tensor, group: int, qk: str) -> torch.Tensor:
    """``x`` [B, H, N, D] float32 rounded as the kernel's buffer holds it: one scale per ``group`` tokens."""
    b, h, n, d = x.shape
    pad = -n % group
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, (n + pad) // group, group, d)
    scale = padded.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_AMAX_FLOOR) / _QMAX[qk]
    scaled = padded / scale
    if qk == "int8":
        rounded = scaled.round().clamp(-127, 127)
    else:
        rounded = scaled.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (rounded * scale).view(b, h, n + pad, d)[:, :, :n]


def _check(qk: str, pv: str) -> None:
    if qk not in QK_FORMATS:
        raise ValueError(f"qk: {qk!r} is not allowed; allowed values: {list(QK_FORMATS)}")
    if pv not in PV_FORMATS:
        raise ValueError(f"pv: {pv!r} is not allowed; allowed values: {list(PV_FORMATS)}")


def emulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: str = "int8", pv: str = "fp8") -> torch.Tensor:
    """What ``lowbit_attention`` computes, in float32 on any device: [B, H, Nq, D] in q's dtype."""
    _check(qk, pv)
    qf, kf, vf = q.float(), k.float(), v.float()
    kf = kf - kf.mean(dim=2, keepdim=True)
    qr = _round_groups(qf, Q_GROUP, qk)
    kr = _round_groups(kf, K_GROUP, qk)
    logits = (qr @ kr.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(logits, dim=-1)
    if pv == "fp16":
        return (p.half().float() @ vf.half().float()).to(q.dtype)
    p_max = p.amax(dim=-1, keepdim=True)  # the kernel scales by the running max's exp: 1 at the row's maximum
    p8 = (p / p_max * P_SCALE).to(torch.float8_e4m3fn).float() * p_max / P_SCALE
    v_mean = vf.mean(dim=2, keepdim=True)
    centred = vf - v_mean
    v_scale = centred.abs().amax(dim=2, keepdim=True).clamp_min(_AMAX_FLOOR) / 448.0
    v8 = (centred / v_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * v_scale
    return (p8 @ v8 + v_mean).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, capability 8.9+)

if triton is not None:

    @triton.jit
    def _quantize_groups_kernel(
        X, MEAN, OUT, SCALE,
        stride_xb, stride_xh, stride_xn, stride_xd,
        H, N, NPAD, extra_scale,
        D: tl.constexpr, GROUP: tl.constexpr, HAS_MEAN: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr,
    ):  # fmt: skip
        """One program per (token group, batch x head): [GROUP, D] values -> one scale and 8-bit values."""
        group = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = group * GROUP + tl.arange(0, GROUP)
        offs_d = tl.arange(0, D)
        valid = offs_n[:, None] < N
        ptrs = X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd
        x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        if HAS_MEAN:
            x = tl.where(valid, x - tl.load(MEAN + bh * D + offs_d)[None, :], 0.0)
        amax = tl.maximum(tl.max(tl.abs(x)), 1e-12)
        scale = amax / QMAX
        y = x / scale
        if IS_INT8:
            y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
        else:
            y = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(OUT + bh * NPAD * D + offs_n[:, None] * D + offs_d[None, :], y)
        tl.store(SCALE + bh * (NPAD // GROUP) + group, scale * extra_scale)

    @triton.jit
    def _quantize_v_kernel(
        X, VMEAN, VSCALE, OUT,
        stride_xb, stride_xh, stride_xn, stride_xd,
        H, N, NPAD,
        D: tl.constexpr, BLOCK: tl.constexpr, TO_FP8: tl.constexpr,
    ):  # fmt: skip
        """(V [BLOCK tokens, D] - its mean) / its per-channel scale -> e4m3 (or V as it is -> fp16), stored
        transposed ([B*H, D, NPAD])."""
        block = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = block * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        ptrs = X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd
        valid = offs_n[:, None] < N
        x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        if TO_FP8:
            x = tl.where(valid, x - tl.load(VMEAN + bh * D + offs_d)[None, :], 0.0)
            y = (x / tl.load(VSCALE + bh * D + offs_d)[None, :]).to(tl.float8e4nv, fp_downcast_rounding="rtne")
        else:
            y = x.to(tl.float16)
        tl.store(OUT + bh * D * NPAD + offs_d[None, :] * NPAD + offs_n[:, None], y)

    @triton.jit
    def _attention_kernel(
        Q, K, VT, QS, KS, VS, VM, OUT,
        stride_ob, stride_oh, stride_on, stride_od,
        H, N_Q, N_K, NPAD_Q, NPAD_K,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr,
        Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr, LOG2_P_SCALE: tl.constexpr, PV_FP8: tl.constexpr,
    ):  # fmt: skip
        """One program per (BLOCK_M queries, batch x head): online softmax over every key block."""
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + bh * NPAD_Q * D + offs_m[:, None] * D + offs_d[None, :])
        q_scale = tl.load(QS + bh * (NPAD_Q // Q_GROUP) + offs_m // Q_GROUP)  # softmax scale and log2(e) folded in
        k_ptrs = K + bh * NPAD_K * D + offs_n[:, None] * D + offs_d[None, :]
        v_ptrs = VT + bh * D * NPAD_K + offs_d[:, None] * NPAD_K + offs_n[None, :]
        ks_ptrs = KS + bh * (NPAD_K // K_GROUP) + offs_n // K_GROUP
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start_n in range(0, N_K, BLOCK_N):
            k = tl.load(k_ptrs)
            k_scale = tl.load(ks_ptrs)
            if QK_INT8:
                qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = qk * q_scale[:, None] * k_scale[None, :]
            if start_n + BLOCK_N > N_K:  # the last block: padded keys take no weight
                qk = tl.where((start_n + offs_n)[None, :] < N_K, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # P times P_SCALE in one exp2 (LOG2_P_SCALE added to the exponent); the row sums carry the same factor,
            # so it cancels in acc / l
            p = tl.math.exp2(qk - (m_new[:, None] - LOG2_P_SCALE))
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            vt = tl.load(v_ptrs)
            if PV_FP8:
                acc = tl.dot(p.to(tl.float8e4nv, fp_downcast_rounding="rtne"), tl.trans(vt), acc)
            else:
                acc = tl.dot(p.to(tl.float16), tl.trans(vt), acc)
            m_i = m_new
            k_ptrs += BLOCK_N * D
            v_ptrs += BLOCK_N
            ks_ptrs += BLOCK_N // K_GROUP
        v_scale = tl.load(VS + bh * D + offs_d)
        out = acc * v_scale[None, :] / l_i[:, None]
        if PV_FP8:
            out += tl.load(VM + bh * D + offs_d)[None, :]
        o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < N_Q)


# Block sizes and launch settings (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim, chosen on an H200
# (bench/bench_lowbit_attention.py --sweep; BLOCK_M must divide Q's padding, BLOCK_N be a multiple of K_GROUP).
LAUNCH = {128: (64, 128, 4, 3), 64: (64, 128, 4, 3)}


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: str = "int8", pv: str = "fp8"):
    """The kernel's operands from [B, H, N, D] q, k, v: 8-bit Q and K (padded to ``TOKEN_PAD`` tokens) with their
    group scales (Q's carry the softmax scale and log2(e)), V transposed: e4m3 of V less its mean over tokens, with
    its per-channel scale and that mean (``[B, H, D]``, added back to the output), or fp16 (scale 1, mean 0)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    npad_q, npad_k = -(-n_q // TOKEN_PAD) * TOKEN_PAD, -(-n_k // TOKEN_PAD) * TOKEN_PAD
    dtype = torch.int8 if qk == "int8" else torch.float8_e4m3fn
    device = q.device
    q8 = torch.empty(b * h, npad_q, d, dtype=dtype, device=device)
    k8 = torch.empty(b * h, npad_k, d, dtype=dtype, device=device)
    v_dtype = torch.float8_e4m3fn if pv == "fp8" else torch.float16
    vt8 = torch.empty(b * h, d, npad_k, dtype=v_dtype, device=device)
    q_scale = torch.empty(b * h, npad_q // Q_GROUP, dtype=torch.float32, device=device)
    k_scale = torch.empty(b * h, npad_k // K_GROUP, dtype=torch.float32, device=device)
    k_mean = k.mean(dim=2, dtype=torch.float32).contiguous()  # [B, H, D]
    if pv == "fp8":
        v_mean = v.mean(dim=2, dtype=torch.float32)
        v_min, v_max = torch.aminmax(v, dim=2)
        v_amax = torch.maximum(v_max.float() - v_mean, v_mean - v_min.float())
        v_scale = (v_amax.clamp_min(_AMAX_FLOOR) / 448.0).contiguous()  # [B, H, D]
        v_mean = v_mean.contiguous()
    else:
        v_mean = torch.zeros(b, h, d, dtype=torch.float32, device=device)
        v_scale = torch.ones(b, h, d, dtype=torch.float32, device=device)
    is_int8, qmax = qk == "int8", _QMAX[qk]
    softmax = LOG2E / math.sqrt(d)
    _quantize_groups_kernel[(npad_q // Q_GROUP, b * h)](
        q, q, q8, q_scale, *q.stride(), h, n_q, npad_q, softmax,
        D=d, GROUP=Q_GROUP, HAS_MEAN=False, IS_INT8=is_int8, QMAX=qmax, num_warps=4,
    )  # fmt: skip
    _quantize_groups_kernel[(npad_k // K_GROUP, b * h)](
        k, k_mean, k8, k_scale, *k.stride(), h, n_k, npad_k, 1.0,
        D=d, GROUP=K_GROUP, HAS_MEAN=True, IS_INT8=is_int8, QMAX=qmax, num_warps=4,
    )  # fmt: skip
    _quantize_v_kernel[(npad_k // 64, b * h)](
        v, v_mean, v_scale, vt8, *v.stride(), h, n_k, npad_k, D=d, BLOCK=64, TO_FP8=pv == "fp8", num_warps=4
    )
    return q8, k8, vt8, q_scale, k_scale, v_scale, v_mean


def lowbit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qk: str = "int8",
    out: torch.Tensor | None = None,
    pv: str = "fp8",
) -> torch.Tensor:
    """Softmax attention of [B, H, Nq, D] queries over [B, H, Nk, D] keys and values (no mask), 8-bit as the module
    docstring says; returns [B, H, Nq, D] in q's dtype, or fills ``out`` (any [B, H, Nq, D] view, e.g. of a
    [B, Nq, H*D] tensor) and returns it."""
    _check(qk, pv)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    block_m, block_n, warps, stages = LAUNCH[d]
    q8, k8, vt8, q_scale, k_scale, v_scale, v_mean = quantize_qkv(q, k, v, qk, pv)
    if out is None:
        out = torch.empty(b, n_q, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    _attention_kernel[(q8.shape[1] // block_m, b * h)](
        q8, k8, vt8, q_scale, k_scale, v_scale, v_mean, out, *out.stride(), h, n_q, n_k, q8.shape[1], k8.shape[1],
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, QK_INT8=qk == "int8", Q_GROUP=Q_GROUP, K_GROUP=K_GROUP,
        LOG2_P_SCALE=math.log2(P_SCALE), PV_FP8=pv == "fp8", num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
