"""Every launch path of the fused fp8 quantizer, compiled, on the GPU, against the torch computation of the same
numbers (``tests/quant_reference.py``; the CPU runs the same cases through Triton's interpreter): scales,
histories and overshoot to float32 rounding, and fp8 codes equal but for a rare tie (the kernel's division and
torch's may round a value on a rounding boundary differently: such codes are one step apart, ``far`` counts any
further), for fp16, bf16 and fp32 inputs."""

import pytest
import torch
from quant_reference import check_all, expected_cases

from fp8_quant import supports_fp8_compute

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not supports_fp8_compute(), reason="needs a CUDA GPU with FP8 compute (capability 8.9+)"),
]


def test_every_launch_path_matches_torch():
    from fp8_quant import quant_triton

    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    results = check_all(quant_triton, "cuda", dtypes=dtypes)
    assert len(results) == expected_cases(dtypes=len(dtypes))
    failed = {
        name: measures
        for name, measures in results.items()
        if measures["codes"] > 0.05 or any(v > 1e-6 for k, v in measures.items() if k != "codes")
    }
    assert not failed, failed
