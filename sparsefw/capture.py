"""What runs on a block's calibration inputs (model plumbing): capturing the first block's inputs,
the block forward, the hooks that accumulate every Linear layer's Gram matrix G = X X^T, and the
grouping of a block's layers by shared input.

The calibration inputs of the first block and every block's extra arguments (attention masks,
position embeddings; Gemma3 gives sliding-window and full-attention layers different ones) are
captured with one forward in which every block is a pass-through, so no block needs to be on the
device (or even materialized) for it. As in Wanda's and SparseGPT's reference drivers, the Gram
matrices come from forward hooks on the Linear layers while the block runs on those inputs.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .distributed import GRAM_CHUNK, Ranks, broadcast_object, two_sum_
from .errors import SparseFWError
from .models import get_weight, prunable_layers
from .onload import module_device


class StopForward(Exception):
    """Raised inside a forward (by a hook or a pass-through block) once what was needed has run;
    the caller catches it and skips the rest of the model or block."""


def hidden_from(args, kwargs) -> torch.Tensor:
    """The hidden states a decoder block was called with (first positional or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


def block_forward(block: nn.Module, h: torch.Tensor, extra) -> torch.Tensor:
    """Run a decoder block on hidden states h (1, seqlen, hidden) with its captured (args,
    kwargs) ``extra`` (:func:`capture_block_inputs`); returns its output hidden states."""
    args, kw = extra
    out = block(h, *args, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise SparseFWError if x has NaN/Inf (``where`` names the place, e.g. a layer)."""
    if not torch.isfinite(x).all():
        raise SparseFWError(f"NaN/Inf in the activations entering {where}; the model's weights or "
                            "the calibration text produce non-finite values (check the checkpoint, "
                            "use float32)")


def full_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its full name in ``model`` (e.g. ``model.layers.3.self_attn.q_proj``)."""
    return {id(m): n for n, m in model.named_modules()}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                         store: torch.device | None = None):
    """Record the first block's calibration inputs and every block's extra arguments.

    Every block's ``forward`` is replaced by a pass-through for the duration (the models of
    transformers 5 take a block's output as the next block's hidden states), so only the
    modules before the first block run: they must be on the device of the input embeddings
    (:func:`sparsefw.onload.place_embeddings`). The forward stops after the last block.

    Args:
        model: a Hugging Face causal LM. blocks: its decoder blocks (:func:`sparsefw.models.decoder_blocks`).
        windows: (nsamples, seqlen) int64 token ids (moved to the input embeddings' device).
        store: where to keep the captured inputs (default: where they were computed).
    Returns:
        (inps, extra): inps = list of nsamples (1, seqlen, hidden) tensors in the model's dtype;
        extra = per block a tuple (positional args after the hidden states, keyword args) with
        tensors on the input embeddings' device.
    """
    extra: list = [None] * len(blocks)
    inps: list = []
    state = {"full": True}
    last = len(blocks) - 1

    def make_forward(i):
        def forward(*args, **kwargs):
            if extra[i] is None:
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if kw.get("past_key_values") is None:
                    kw.pop("past_key_values", None)
                extra[i] = (tuple(args[1:]), kw)
            h = hidden_from(args, kwargs)
            if i == 0:
                inps.append(h.detach().to(store) if store is not None else h.detach())
                if not state["full"]:
                    raise StopForward
            if i == last:
                raise StopForward
            return h
        return forward

    saved = [b.__dict__.get("forward") for b in blocks]   # e.g. accelerate's hooked forward
    for i, b in enumerate(blocks):
        b.forward = make_forward(i)   # instance attribute: shadows the class's forward
    dev = model.get_input_embeddings().weight.device
    try:
        for j in range(windows.shape[0]):
            state["full"] = j == 0
            try:
                model(windows[j:j + 1].to(dev), use_cache=False)
            except StopForward:
                pass
    finally:
        for b, f in zip(blocks, saved):
            del b.forward
            if f is not None:
                b.forward = f
    return inps, extra


class _GramHooks:
    """The state of one :func:`accumulate_gram_pairs` call: per group of layers that read the same
    input tensor, [sum of this chunk, hi, lo] in float64; per window, which inputs were seen."""

    def __init__(self, layers: dict, names, diagonal: bool, timer, stop_early: bool):
        self.layers, self.names, self.diagonal, self.timer = layers, names or {}, diagonal, timer
        self.stop_early = stop_early
        self.group: dict[str, str] = {}   # layer -> first layer reading the same input (window 0)
        self.acc: dict[str, list] = {}    # group -> [chunk sum, hi, lo]
        self.seen: dict = {}              # this window: id(x) -> (x, group)
        self.ran: set = set()             # this window: layers that have run

    def hook(self, lname: str):
        def fn(mod, inp, out):
            x = inp[0]
            self.ran.add(lname)
            # Same tensor object as an earlier layer's input (q/k/v, gate/up)? The cache holds a
            # reference to x, so its id cannot be reused by a later tensor while cached (keying by
            # data_ptr() was wrong: a freed input's address is reused by the next one).
            hit = self.seen.get(id(x))
            if hit is not None and hit[0] is x:
                self.group.setdefault(lname, hit[1])
            else:
                self._add(lname, mod, x)
            if self.stop_early and len(self.ran) == len(self.layers):
                raise StopForward
        return fn

    def _add(self, lname: str, mod, x: torch.Tensor) -> None:
        g = self.group.setdefault(lname, lname)
        self.seen[id(x)] = (x, g)
        t = time.perf_counter()
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        check_finite(x2, f"layer {self.names.get(id(mod), lname)}")
        inc = (x2 * x2).sum(0).double() if self.diagonal else (x2.t() @ x2).double()
        if g not in self.acc:
            self.acc[g] = [inc, torch.zeros_like(inc), torch.zeros_like(inc)]
        else:
            self.acc[g][0] += inc
        if self.timer is not None:
            self.timer["gram"] = self.timer.get("gram", 0.0) + time.perf_counter() - t

    def end_chunk(self) -> None:
        """Add the chunk sums to (hi, lo) with error-free additions and restart them."""
        for c, hi, lo in self.acc.values():
            two_sum_(hi, lo, c)
            c.zero_()

    def pairs(self) -> dict:
        """{layer: (hi, lo)}; zeros for a layer that never ran (no windows on this rank)."""
        for n, l in self.layers.items():
            if n not in self.group:
                d = get_weight(l).shape[1]
                z = torch.zeros((d,) if self.diagonal else (d, d), dtype=torch.float64, device=get_weight(l).device)
                self.acc[n] = [z, z, z.clone()]
                self.group[n] = n
        return {n: (self.acc[self.group[n]][1], self.acc[self.group[n]][2]) for n in self.layers}


@torch.no_grad()
def accumulate_gram_pairs(block: nn.Module, inps: list, extra, names: dict | None = None,
                          first: int = 0, chunk: int = GRAM_CHUNK, timer: dict | None = None,
                          layers: list[str] | None = None, diagonal: bool = False,
                          outputs: list | None = None) -> dict:
    """Run a block on its calibration inputs and accumulate its Linear layers' Gram matrices.

    G = sum over calibration tokens of x x^T, computed per sample in float32 and summed in float64
    (float32 alone differs from float64 by ~1e-7 relative): plainly within chunks of ``chunk``
    consecutive windows, then the chunk sums as an unevaluated pair hi + lo with error-free
    additions (:func:`sparsefw.distributed.two_sum_`), so that several processes holding different
    chunks round to the same G. Layers that read the same input tensor (q/k/v, gate/up) share one
    product per sample and one accumulator.

    Args:
        block: a decoder block (on the compute device). inps: list of (1, seqlen, hidden) inputs
            (any device; each is moved to the block's for its forward). extra: the block's
            (args, kwargs) from :func:`capture_block_inputs`. names: module id -> full name (errors).
        first: global index of ``inps[0]`` among all calibration windows (chunks are global).
        chunk: windows per plain float64 chunk (:data:`sparsefw.distributed.GRAM_CHUNK`).
        timer: optional dict; its ``"gram"`` entry is increased by the seconds spent in the
            Gram products (the rest of the call is the block's forward).
        layers: names (within the block) of the layers to accumulate; default all. Unless
            ``outputs`` is given, each window's forward stops once all of them have run.
        diagonal: accumulate only diag(G) = ||X_j||^2 per input feature (OWL's pre-pass).
        outputs: if a list, the block's (1, seqlen, hidden) outputs are appended to it (on each
            input's device).
    Returns: {layer name within the block: (hi, lo)}, two float64 tensors, (d_in, d_in) (or
        (d_in,) with ``diagonal``) on the layer's device (the same tensor objects for layers that
        share an input).
    Raises: SparseFWError on NaN/Inf activations.
    """
    todo = {n: l for n, l in prunable_layers(block).items() if layers is None or n in layers}
    st = _GramHooks(todo, names, diagonal, timer, stop_early=outputs is None)
    handles = [l.register_forward_hook(st.hook(n)) for n, l in todo.items()]
    dev = module_device(block)
    try:
        for j, h in enumerate(inps):
            st.seen.clear()
            st.ran.clear()
            try:
                o = block_forward(block, h.to(dev), extra)
                if outputs is not None:
                    outputs.append(o.to(h.device))
            except StopForward:
                pass
            if (first + j + 1) % chunk == 0 or j == len(inps) - 1:   # end of a (global) chunk
                st.end_chunk()
    finally:
        for hd in handles:
            hd.remove()
    return st.pairs()


def accumulate_grams(block: nn.Module, inps: list, extra, names: dict | None = None) -> dict:
    """{layer name within the block: (d_in, d_in) float64 G on the layer's device}: the Gram
    matrices of :func:`accumulate_gram_pairs`, evaluated (hi + lo). Raises as it does."""
    return {n: hi + lo for n, (hi, lo) in accumulate_gram_pairs(block, inps, extra, names).items()}


def layer_groups(block: nn.Module, inps: list, extra, ranks: Ranks) -> list[list[str]]:
    """The block's Linear layers in the order its forward runs them, grouped by shared input
    (Llama: [q, k, v], [o], [gate, up], [down]); found on one window of the last rank (which
    always holds windows) and broadcast, so that every rank uses the same groups."""
    src = ranks.world - 1
    groups: list[list[str]] = []
    if ranks.rank == src:
        last: list = [None]

        def make_hook(lname):
            def hook(mod, inp, out):
                if groups and inp[0] is last[0]:
                    groups[-1].append(lname)
                else:
                    groups.append([lname])
                    last[0] = inp[0]
            return hook

        handles = [l.register_forward_hook(make_hook(n)) for n, l in prunable_layers(block).items()]
        try:
            block_forward(block, inps[0].to(module_device(block)), extra)
        finally:
            for hd in handles:
                hd.remove()
        seen: set = set()
        groups = [[n for n in g if not (n in seen or seen.add(n))] for g in groups]   # first run only
        groups = [g for g in groups if g]
        missing = [n for n in prunable_layers(block) if n not in seen]
        if missing:
            groups.append(missing)                # layers the forward did not run: last, together
    return broadcast_object(groups, src, ranks)
