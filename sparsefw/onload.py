"""Block placement (model plumbing): which parts of the model are on the compute device, when.

Sequential onloading, as in SparseGPT's and llm-compressor's drivers: the model stays where it was
loaded (the CPU, or the meta device when streaming); only the modules that run before the first
decoder block (embeddings, rotary embedding, ...) and the one block being pruned are moved to the
compute device. The LM head and the final norm are never needed for calibration.

What runs on the blocks' calibration inputs is in :mod:`sparsefw.capture`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def outside_modules(model: nn.Module, blocks: nn.ModuleList, head: nn.Module | None):
    """The largest submodules of ``model`` that contain neither the blocks nor the LM head."""
    stop = {id(blocks)} | ({id(head)} if head is not None else set())

    def contains(m):
        return any(id(x) in stop for x in m.modules())

    def walk(m):
        for child in m.children():
            if id(child) in stop:
                continue
            if contains(child):
                yield from walk(child)
            else:
                yield child

    return list(walk(model))


def place_embeddings(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move everything that runs before the first block (embeddings, rotary embedding, OPT's
    positional embedding and projections, final norm) to ``device``; not the blocks, not the LM
    head (unless tied to the input embeddings, which then moves with them)."""
    head = model.get_output_embeddings()
    for m in outside_modules(model, blocks, head):
        m.to(device)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device):
    """Run the body with ``module`` on ``device``; move it back to where it was afterwards."""
    home = module_device(module)
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def placed_for_eval(model: nn.Module, device: torch.device, block_class: str | None = None):
    """Run the body (an evaluation) with the whole model on ``device``, then put it back on the
    CPU. On CUDA the model is dispatched with accelerate (``infer_auto_device_map`` +
    ``dispatch_model``): blocks that do not fit in GPU memory stay on the CPU and are moved in on
    the fly, so a model larger than the GPU still evaluates. On the CPU nothing moves.

    Args: model: a causal LM on the CPU. device: the evaluation device. block_class: class name of
        a decoder block (never split across devices).
    """
    if device.type == "cpu":
        model.to(device)
        yield model
        return
    if device.type != "cuda":
        model.to(device)
        try:
            yield model
        finally:
            model.to("cpu")
        return
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    idx = device.index if device.index is not None else torch.cuda.current_device()
    free, _ = torch.cuda.mem_get_info(idx)
    dm = infer_auto_device_map(model, max_memory={idx: int(0.85 * free), "cpu": 2 ** 50},
                               no_split_module_classes=[block_class] if block_class else None)
    if set(dm.values()) <= {idx}:
        model.to(device)
    else:
        dispatch_model(model, dm, main_device=idx)
    try:
        yield model
    finally:
        remove_hook_from_module(model, recurse=True)
        model.to("cpu")


class Float32OnCpu:
    """Context manager: on the CPU, a 16-bit block computes in float32 while it is pruned.

    CPUs without bf16 matrix units emulate 16-bit matmuls (measured here, AMD EPYC: a bf16
    ``nn.Linear`` ran at 16 GFLOP/s, float32 at 35-75), so the block's parameters are cast to
    float32 on entry and back to their dtype on exit (exact for the weights the block had; new
    weights are rounded as :func:`sparsefw.models.set_weight` rounds them). :meth:`round` rounds
    the block's weights to its dtype (and back to float32) so that the block's outputs are those of
    the weights that will be saved. On other devices, or for float32 blocks, it does nothing.
    """

    def __init__(self, block: nn.Module, device: torch.device):
        self.block = block
        dt = next((p.dtype for p in block.parameters()), None)
        self.dtype = dt if device.type == "cpu" and dt in (torch.bfloat16, torch.float16) else None

    def __enter__(self):
        if self.dtype is not None:
            self.block.float()
        return self

    def round(self) -> None:
        if self.dtype is not None:
            self.block.to(self.dtype).float()

    def __exit__(self, *exc):
        if self.dtype is not None:
            self.block.to(self.dtype)
        return False
