"""A CPU model of why the 8-bit attention kernel's error grows with the number of keys when V has a mean.

Why: on an H200 the kernel gives 0.097 relative error at 14040 keys on inputs whose V has a mean per channel
(``testing.attention_inputs``, as the xfail GPU test uses), against 0.039 on zero-mean V and against ~0.002 for its
own float32 emulation of the same inputs. The kernel chains every key block's fp8 P x V product through the tensor
cores' accumulator (``acc = tl.dot(p8, v8, acc)``), and an fp8 MMA on Hopper keeps only about 13-14 bits of the
accumulation (the DeepSeek-V3 report): each instruction aligns its products and the incoming accumulator to the
largest of them and drops the bits below. Once the sum over keys is ~2^13 times one key's share, whole products
fall below the kept bits, so a sum of same-sign terms (V's mean) comes out short; zero-mean sums stay small and
keep their products. Promoting each key block's product into a float32 sum (``acc += tl.dot(p8, v8)``) avoids it,
and so does smoothing V (its mean over tokens subtracted before rounding, added back to the output), the fix the
kernel took: the sum is then of mixed-sign terms, as for zero-mean V (the third set of inputs).

The model: P and V rounded as the kernel rounds them (P over its row maximum times ``P_SCALE``, V per channel),
then the products summed in steps of ``MMA_K`` keys; each step keeps, of the incoming sum and its products, only
multiples of ``2^(e - bits)`` (``e`` the largest one's binary exponent, truncated toward zero), chained over all
keys or restarted per key block and added in float64. A subsample of queries (the error is an average over rows).

Usage: python bench/lowbit_attention_accumulation.py [--json PATH] [--queries 128] [--heads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_quant import lowbit_attention as la
from fp8_quant.testing import attention_inputs, rel_err

MMA_K = 32  # keys per fp8 MMA instruction on Hopper (wgmma k for 8-bit operands)
KEYS = (2048, 14040)
VARIANTS = (("float32", None, None), ("chained, 13 bits", 13, None), ("chained, 14 bits", 14, None),
            ("per 64-key block, 13 bits", 13, 64), ("per 128-key block, 13 bits", 13, 128))  # fmt: skip


def rounded_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_v: bool = False):
    """P's e4m3 codes (times ``P_SCALE`` over the row maximum), the row sums the kernel divides by, V's e4m3 codes,
    V's per-channel scale and the mean added back to the output: int8 QK after smoothing K, V smoothed by its mean
    over tokens (the kernel since V smoothing) or not (the kernel before)."""
    v_mean = v.mean(dim=2, keepdim=True) if smooth_v else torch.zeros_like(v[:, :, :1])
    v = v - v_mean
    kf = k - k.mean(dim=2, keepdim=True)
    qr = la._round_groups(q, la.Q_GROUP, "int8")
    kr = la._round_groups(kf, la.K_GROUP, "int8")
    p = torch.softmax((qr @ kr.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    scaled = p / p.amax(dim=-1, keepdim=True) * la.P_SCALE
    v_scale = v.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / 448.0
    v8 = (v / v_scale).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    p8, sums = scaled.to(torch.float8_e4m3fn).double(), scaled.sum(-1, keepdim=True).double()
    return p8, sums, v8, v_scale.double(), v_mean.double()


def accumulate(p8: torch.Tensor, v8: torch.Tensor, bits: int | None, block: int | None) -> torch.Tensor:
    """``p8 @ v8`` summed as the model says: exactly (``bits`` None), or in ``MMA_K``-key steps that keep ``bits``
    bits, chained over all keys (``block`` None) or restarted every ``block`` keys into a float64 total."""
    if bits is None:
        return p8 @ v8
    total = torch.zeros(*p8.shape[:-1], v8.shape[-1], dtype=torch.float64)
    acc = torch.zeros_like(total)
    for start in range(0, p8.shape[-1], MMA_K):
        if block is not None and start % block == 0:
            total, acc = total + acc, torch.zeros_like(acc)
        products = p8[..., start : start + MMA_K].unsqueeze(-1) * v8[:, :, start : start + MMA_K].unsqueeze(2)
        terms = torch.cat([acc.unsqueeze(-2), products], dim=-2)
        largest = terms.abs().amax(dim=-2, keepdim=True).clamp_min(1e-300)
        quantum = torch.exp2(torch.floor(torch.log2(largest)) - bits)
        acc = (torch.trunc(terms / quantum) * quantum).sum(dim=-2)
    return total + acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    cases = (("V with a mean (the GPU test's)", True, False), ("zero-mean V (the benchmark's)", False, False),
             ("V with a mean, smoothed", True, True))  # fmt: skip
    for inputs, v_mean, smooth_v in cases:
        for keys in KEYS:
            q, k, v = attention_inputs(b=1, h=args.heads, n_q=keys, n_k=keys, d=128)
            if not v_mean:
                v = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
            q = q[:, :, : args.queries]
            reference = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(128), -1) @ v.double()
            p8, sums, v8, v_scale, mean = rounded_operands(q, k, v, smooth_v)
            for name, bits, block in VARIANTS:
                error = rel_err(accumulate(p8, v8, bits, block) * v_scale / sums + mean, reference)
                print(f"{inputs}, {keys} keys, {name}: {error:.4f}", flush=True)
                rows.append({"inputs": inputs, "keys": keys, "accumulation": name, "rel_err": error})
    if args.json:
        meta = {"kind": "attention-accumulation-model", "torch": torch.__version__, "queries": args.queries,
                "heads": args.heads, "mma_k": MMA_K,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
