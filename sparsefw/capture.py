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

from .distributed import Ranks, all_max, all_sum, broadcast_object, raise_if_any
from .errors import SparseFWError
from .experts import expert_layers, is_fused_experts, routed_experts
from .gram import FixedPointSum, all_finite, fixed_point_scale
from .models import get_weight, prunable_layers
from .onload import module_device


# Bytes of layer inputs the first (bound) pass of accumulate_grams may keep for the second, which then
# needs no block forward (one forward fewer per block); above it the block runs again.
GRAM_INPUT_CACHE_BYTES = 2 ** 30


class StopForward(Exception):
    """Raised inside a forward (by a hook or a pass-through block) once what was needed has run;
    the caller catches it and skips the rest of the model or block."""


def hidden_from(args, kwargs) -> torch.Tensor:
    """The hidden states a decoder block was called with (first positional or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


def _as_dtype(obj, dtype: torch.dtype):
    """Floating-point tensors in obj (nested tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_dtype(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _as_dtype(v, dtype) for k, v in obj.items()}
    return obj


def block_forward(block: nn.Module, h: torch.Tensor, extra) -> torch.Tensor:
    """Run a decoder block on hidden states h (1, seqlen, hidden) with its captured (args,
    kwargs) ``extra`` (:func:`capture_block_inputs`); returns its output hidden states. h and the
    floating-point extras are cast to the block's dtype (a block computing in float32 on the CPU,
    :class:`sparsefw.onload.Float32OnCpu`, receives 16-bit inputs for the first block)."""
    args, kw = extra
    dt = next((p.dtype for p in block.parameters()), h.dtype)
    if h.dtype != dt:
        h, args, kw = h.to(dt), _as_dtype(args, dt), _as_dtype(kw, dt)
    out = block(h, *args, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise SparseFWError if x has NaN/Inf (``where`` names the place, e.g. a layer)."""
    if not all_finite(x):
        raise SparseFWError(f"NaN/Inf in the activations entering {where}; the model's weights or "
                            "the calibration text produce non-finite values (check the checkpoint, "
                            "use float32)")


def full_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its full name in ``model`` (e.g. ``model.layers.3.self_attn.q_proj``), expert
    slices included (``model.layers.3.mlp.experts.down_proj[5]``, :mod:`sparsefw.experts`)."""
    out = {}
    for n, m in model.named_modules():
        out[id(m)] = n
        if is_fused_experts(m):
            out.update({id(l): ln for ln, l in expert_layers(m, n).items()})
    return out


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


class _InputHooks:
    """Forward hooks on a block's Linear layers that act once per distinct input per window:
    ``action(rep, x)`` with the group's first layer ``rep`` and its input x (tokens, d_in) float32.
    Layers of one group (q/k/v, gate/up) must receive the very same tensor as ``rep``."""

    def __init__(self, layers: dict, groups: list[list[str]], names, action, stop_early: bool):
        self.layers, self.names, self.action, self.stop_early = layers, names or {}, action, stop_early
        self.rep = {n: g[0] for g in groups for n in g}
        self.inputs: dict = {}            # this window: rep -> its input tensor
        self.ran: set = set()             # this window: layers that have run

    def hook(self, lname: str):
        def fn(mod, inp, out):
            x, rep = inp[0], self.rep[lname]
            self.ran.add(lname)
            if rep == lname:
                self.inputs[rep] = x      # held: its id cannot be reused by a later tensor
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                check_finite(x2, f"layer {self.names.get(id(mod), lname)}")
                self.action(rep, x2)
            elif self.inputs.get(rep) is not x:
                raise SparseFWError(f"layers {rep} and {lname} were grouped as reading one input but "
                                    "received different tensors; this architecture needs --true-sequential "
                                    "or a report of the model type")
            if self.stop_early and len(self.ran) == len(self.layers):
                raise StopForward
        return fn

    def run(self, block: nn.Module, inps: list, extra, outputs: list | None = None) -> None:
        """One forward of ``block`` per input window (stopped once every hooked layer ran, unless
        ``outputs`` collects the block's outputs)."""
        handles = [l.register_forward_hook(self.hook(n)) for n, l in self.layers.items()]
        dev = module_device(block)
        try:
            for h in inps:
                self.inputs.clear()
                self.ran.clear()
                try:
                    with routed_experts(block):
                        o = block_forward(block, h.to(dev), extra)
                    if outputs is not None:
                        outputs.append(o.to(h.device))
                except StopForward:
                    pass
        finally:
            for hd in handles:
                hd.remove()
            self.inputs.clear()


@torch.no_grad()
def accumulate_grams(block: nn.Module, inps: list, extra, groups: list[list[str]], names: dict | None = None,
                     ranks: Ranks = Ranks(), timer: dict | None = None, diagonal: bool = False,
                     outputs: list | None = None) -> dict[str, FixedPointSum]:
    """Run a block on its calibration inputs and sum the Gram matrix of every distinct input.

    G = sum over calibration tokens of x x^T, one :class:`sparsefw.gram.FixedPointSum` (one int64
    buffer) per group of layers reading the same input (:func:`layer_groups`): exact integer sums
    of the float32 window products on a grid fixed beforehand from a bound on |G| over all
    windows of all processes (a first, early-stopped pass finds max |x| per input;
    :func:`sparsefw.gram.fixed_point_scale`). So the result is bit for bit the same for any
    order and any split of the windows across processes. The first pass keeps the layer inputs
    when they fit :data:`GRAM_INPUT_CACHE_BYTES` (and no ``outputs`` are asked for): the sums are
    then made from them without running the block a second time (the same bits either way).

    Args:
        block: a decoder block (on the compute device). inps: this rank's list of (1, seqlen,
            hidden) inputs (any device; each is moved to the block's). extra: the block's (args,
            kwargs) from :func:`capture_block_inputs`. groups: lists of layer names within the
            block, each list reading one input, its first layer running first (the same on every
            rank). names: module id -> full name (errors). ranks: the processes sharing the windows
            (a collective: every rank calls it with the same groups).
        timer: optional dict; its ``"gram"`` entry is increased by the seconds spent in the
            products (the rest of the call is the block's forward).
        diagonal: sum only diag(G) = ||X_j||^2 per input feature (OWL's pre-pass).
        outputs: if a list, the block's (1, seqlen, hidden) outputs are appended to it (on each
            input's device); else each window's forward stops once the groups' layers have run.
    Returns: {first layer of each group: FixedPointSum} (d_in, d_in) (or (d_in,)) on the layer's device,
        its ``tokens`` attribute the calibration tokens summed (all ranks; an expert's: those routed to it).
    Raises: SparseFWError on NaN/Inf activations (on every rank).
    """
    layers = prunable_layers(block)
    todo = {n: layers[n] for g in groups for n in g}
    peak = {g[0]: [0.0, 0.0] for g in groups}          # rep -> [max |x|, tokens]
    kept, room = ([], GRAM_INPUT_CACHE_BYTES) if outputs is None else (None, 0)   # (rep, x) for the second pass

    def bound(rep, x):
        nonlocal kept, room
        peak[rep][0] = max(peak[rep][0], float(x.abs().max()) if x.numel() else 0.0)
        peak[rep][1] += x.shape[0]
        if kept is not None:
            room -= x.numel() * x.element_size()
            if room < 0:
                kept = None       # too large to keep: the second pass runs the block again
            else:
                kept.append((rep, x.clone()))   # a copy: the forward may reuse the activation's memory

    error = None
    try:
        _InputHooks(todo, groups, names, bound, stop_early=True).run(block, inps, extra)
    except SparseFWError as e:
        error = e
    raise_if_any(error, ranks)
    reps = list(peak)
    maxes = all_max([peak[r][0] for r in reps], ranks)
    tokens = all_sum([peak[r][1] for r in reps], ranks)
    sums = {r: FixedPointSum(get_weight(todo[r]).shape[1], fixed_point_scale(tokens[i] * maxes[i] ** 2),
                             diagonal, get_weight(todo[r]).device) for i, r in enumerate(reps)}
    for i, r in enumerate(reps):
        sums[r].tokens = int(tokens[i])          # calibration tokens behind G (an expert: those routed to it)

    def add(rep, x):
        t = time.perf_counter()
        sums[rep].add_(x)
        if timer is not None:
            timer["gram"] = timer.get("gram", 0.0) + time.perf_counter() - t

    if kept is not None:       # every input of the first pass is at hand: no second forward
        for rep, x in kept:
            add(rep, x)
        return sums
    _InputHooks(todo, groups, names, add, stop_early=outputs is None).run(block, inps, extra, outputs)
    return sums


def evaluate_grams(block: nn.Module, inps: list, extra, names: dict | None = None) -> dict[str, torch.Tensor]:
    """{layer name within the block: (d_in, d_in) float64 G} of every Linear of ``block`` on
    ``inps`` (one process; layers sharing an input share one tensor). Raises as
    :func:`accumulate_grams` does."""
    groups = layer_groups(block, inps, extra, Ranks())
    sums = accumulate_grams(block, inps, extra, groups, names)
    out = {}
    for g in groups:
        G = sums.pop(g[0]).evaluate()
        out.update({n: G for n in g})
    return out


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
            with routed_experts(block):
                block_forward(block, inps[0].to(module_device(block)), extra)
        finally:
            for hd in handles:
                hd.remove()
        seen: set = set()
        groups = [[n for n in g if not (n in seen or seen.add(n))] for g in groups]   # first run only
        groups = [g for g in groups if g]
        # layers the forward did not run on this window (e.g. experts no token was routed to): last,
        # each on its own (no shared input is assumed)
        groups += [[n] for n in prunable_layers(block) if n not in seen]
    return broadcast_object(groups, src, ranks)
