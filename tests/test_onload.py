"""Placement helpers (sparsefw/onload.py): a 16-bit block computes in float32 on the CPU and comes
back in its dtype, with new weights rounded as they will be saved."""
import torch
from torch import nn

from sparsefw.onload import Float32OnCpu


def test_bf16_block_computes_in_float32_on_cpu_and_returns_bf16():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    w0 = lin.weight.detach().clone()
    with Float32OnCpu(lin, torch.device("cpu")) as compute:
        assert lin.weight.dtype == torch.float32
        assert torch.equal(lin.weight.detach().to(torch.bfloat16), w0)      # exact upcast
        lin.weight.data[0, 0] = 1.0 + 2.0 ** -12                           # not a bf16 value
        compute.round()
        assert lin.weight.dtype == torch.float32 and float(lin.weight.detach()[0, 0]) == 1.0
    assert lin.weight.dtype == torch.bfloat16
    assert torch.equal(lin.weight[1:], w0[1:])


def test_float32_blocks_and_other_devices_are_left_alone():
    lin = nn.Linear(4, 3)
    with Float32OnCpu(lin, torch.device("cpu")):
        assert lin.weight.dtype == torch.float32
    half = nn.Linear(4, 3).to(torch.bfloat16)
    with Float32OnCpu(half, torch.device("cuda")):          # a GPU computes bf16 natively
        assert half.weight.dtype == torch.bfloat16
