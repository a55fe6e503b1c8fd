"""Fused mixture-of-experts weights as prunable 2-D layers (model plumbing; no pruning math).

In transformers 5 the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE and the
DeepSeek-V3 family are no ``nn.Linear`` modules: one ``*Experts`` module (decorated with
``transformers.integrations.moe.use_experts_implementation``) holds two fused 3-D parameters,
``gate_up_proj`` (experts, 2 f, d) (or ``up_proj`` without a gate) and ``down_proj`` (experts, d, f),
and its forward routes every token to its top-k experts. Here expert e's slice of each parameter is
a prunable layer of its own: :class:`ExpertLinear`, a Linear whose weight is the view
``param[e]`` (d_out, d_in), so masks and new weights are written straight into the fused tensor.
gpt-oss stores its experts transposed, (experts, d, 2 f) and (experts, f, d), with biases: there the
view is ``param[e].T`` (:func:`expert_layout` tells the layouts apart by their shapes). gate and up of
one expert are one matrix with one input (per-row and N:M masks act along d_in).

While a block is calibrated (:func:`routed_experts`), the experts module runs a plain loop over
the experts that calls these layers on exactly the tokens the router sends to each expert, so the
forward hooks of :mod:`sparsefw.capture` see every expert's routed inputs. The Gram matrices are
not weighted by the routing weights: each expert's mask problem is its own reconstruction, and the
routing weight scales the output of the whole expert (after the gate's nonlinearity), which a
per-layer weighting cannot express; llm-compressor's hooks on unfused expert Linears see the same
unweighted routed tokens. Routers (``gate``) are not pruned.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SparseFWError

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
"""Last name components of a block's router layers (not pruned): Mixtral/Qwen/OLMoE ``gate``,
Qwen2-MoE's ``shared_expert_gate`` (an ``nn.Linear`` to one output)."""

_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def expert_layout(up_shape, down_shape, gated: bool = True) -> str | None:
    """Layout of fused expert weights from their shapes: ``"standard"`` when the up (or gate_up)
    tensor is (experts, k·f, d) and down_proj (experts, d, f), i.e. (experts, d_out, d_in) as
    ``nn.Linear`` keeps them; ``"transposed"`` for (experts, d, k·f) and (experts, f, d), i.e.
    (experts, d_in, d_out) (gpt-oss); None for anything else (k = 2 for a fused gate_up)."""
    if len(up_shape) != 3 or len(down_shape) != 3 or up_shape[0] != down_shape[0]:
        return None
    k = 2 if gated else 1
    if up_shape[1] == k * down_shape[2] and up_shape[2] == down_shape[1]:
        return "standard"
    if up_shape[2] == k * down_shape[1] and up_shape[1] == down_shape[2]:
        return "transposed"
    return None


def _has_gate(mod: nn.Module) -> bool:
    return bool(getattr(mod, "has_gate", isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor)))


def is_transposed(mod: nn.Module) -> bool:
    """Fused experts stored (experts, d_in, d_out): the module's ``is_transposed`` flag where it has
    one (transformers' generic experts), else read from the shapes (gpt-oss)."""
    up = getattr(mod, "gate_up_proj" if _has_gate(mod) else "up_proj")
    return expert_layout(tuple(up.shape), tuple(mod.down_proj.shape), _has_gate(mod)) == "transposed"


def is_fused_experts(mod: nn.Module) -> bool:
    """True for a transformers experts module with fused 3-D weights (gate_up_proj or up_proj, and
    down_proj) in either layout of :func:`expert_layout`, consistent with its ``is_transposed``
    flag where it has one, and a gate (``_apply_gate``) or activation (``act_fn``)."""
    up = getattr(mod, "gate_up_proj" if _has_gate(mod) else "up_proj", None)
    down = getattr(mod, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return False
    if not (hasattr(mod, "_apply_gate") if _has_gate(mod) else hasattr(mod, "act_fn")):
        return False
    layout = expert_layout(tuple(up.shape), tuple(down.shape), _has_gate(mod))
    if hasattr(mod, "is_transposed"):
        return layout == ("transposed" if mod.is_transposed else "standard")
    return layout is not None


def is_router(name: str, mod: nn.Module) -> bool:
    """A block's router: a module whose last name component is in :data:`ROUTER_NAMES` or whose
    class name ends in ``Router`` (``MixtralTopKRouter``, ``DeepseekV3TopkRouter``)."""
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES or type(mod).__name__.lower().endswith("router")


class ExpertLinear(nn.Module):
    """Expert ``e``'s slice of the fused parameter ``pname`` of an experts module, as a Linear.

    ``weight`` is the view ``getattr(experts, pname)[e]`` (d_out, d_in) of whatever tensor the
    module holds now (so a block cast to float32 and back, or moved, is followed; transposed for
    experts stored (experts, d_in, d_out), :func:`is_transposed`), ``bias`` the matching slice of
    ``<pname>_bias`` when the experts have biases. Not registered as a submodule:
    state dicts, saving and streaming see only the fused parameters."""

    def __init__(self, experts: nn.Module, pname: str, e: int):
        super().__init__()
        self.__dict__["_experts"] = weakref.ref(experts)   # not a child module; no cycle keeping it alive
        self.pname, self.e, self.transposed = pname, e, is_transposed(experts)

    @property
    def experts(self) -> nn.Module:
        return self._experts()

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.experts, self.pname)[self.e]
        return w.t() if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.experts, f"{self.pname}_bias", None) if getattr(self.experts, "has_bias", True) else None
        return b[self.e] if isinstance(b, torch.Tensor) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.pname}[{self.e}], {tuple(self.weight.shape)}"


def expert_layers(experts: nn.Module, prefix: str) -> dict[str, ExpertLinear]:
    """{``<prefix>.gate_up_proj[e]`` (or ``up_proj[e]``), ``<prefix>.down_proj[e]``: ExpertLinear}
    for every expert e, in the order a token runs through them; the same objects on every call
    (forward hooks registered on them stay valid)."""
    layers = _LAYERS.get(experts)
    if layers is None:
        up = "gate_up_proj" if _has_gate(experts) else "up_proj"
        layers = [ExpertLinear(experts, p, e) for e in range(experts.down_proj.shape[0]) for p in (up, "down_proj")]
        _LAYERS[experts] = layers
    return {f"{prefix}.{l.pname}[{l.e}]" if prefix else f"{l.pname}[{l.e}]": l for l in layers}


def forget_layers(experts: nn.Module) -> None:
    """Drop the cached :class:`ExpertLinear` views of ``experts`` (after its experts were removed or
    renumbered, :mod:`sparsefw.expert_drop`); the next :func:`expert_layers` call makes new ones."""
    _LAYERS.pop(experts, None)


def _routed_forward(experts: nn.Module, layers: dict, observe=None):
    """The experts' forward as a loop over experts that calls :class:`ExpertLinear` layers on each
    expert's routed tokens (transformers' eager semantics: gate/activation by the module's own
    ``_apply_gate`` / ``act_fn``, optional post-expert norm, routing weights, sum over the top-k).
    ``observe(e, g, y)``, if given, sees every expert's routing weights g (n,) and outputs y (n, d)."""
    up = [l for l in layers.values() if l.pname != "down_proj"]
    down = [l for l in layers.values() if l.pname == "down_proj"]

    def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        for e in range(len(down)):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            h = up[e](hidden_states[tok])
            h = experts._apply_gate(h) if _has_gate(experts) else experts.act_fn(h)
            y = down[e](h)
            if getattr(experts, "has_post_expert_norm", False):
                y = experts.post_expert_norm(y)
            if observe is not None:
                observe(e, top_k_weights[tok, pos], y)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out
    return forward


@contextlib.contextmanager
def routed_experts(block: nn.Module, observe=None):
    """Context manager: every fused experts module of ``block`` runs :func:`_routed_forward`, so
    forward hooks on its :class:`ExpertLinear` layers fire with each expert's routed tokens.
    ``observe(name, e, g, y)``: called with the experts module's name in the block, the expert, its
    routing weights (n,) and its outputs (n, d) (:mod:`sparsefw.expert_drop`)."""
    mods = [(n, m) for n, m in block.named_modules() if is_fused_experts(m)]
    saved = [m.__dict__.get("forward") for _, m in mods]
    for n, m in mods:
        obs = None if observe is None else (lambda e, g, y, n=n: observe(n, e, g, y))
        m.forward = _routed_forward(m, expert_layers(m, n), obs)
    try:
        yield
    finally:
        for (_, m), f in zip(mods, saved):
            del m.forward
            if f is not None:
                m.forward = f


def tensor_name(layer: str) -> str:
    """The saved tensor of a prunable layer's weight: ``<layer>.weight`` for a Linear, the layer
    name itself for an expert slice (``a.experts.down_proj[3]``: index 3 of tensor ``a.experts.down_proj``)."""
    return layer if layer.endswith("]") else f"{layer}.weight"


def split_tensor_name(name: str) -> tuple[str, int | None]:
    """``"a.experts.down_proj[3]"`` -> (``"a.experts.down_proj"``, 3); any other name -> (name, None)."""
    if name.endswith("]") and "[" in name:
        base, idx = name[:-1].rsplit("[", 1)
        return base, int(idx)
    return name, None


def saved_tensor_names(model: nn.Module, layers: list[str]) -> list[str]:
    """The names, in the files ``model.save_pretrained`` writes, of the tensors holding the pruned
    ``layers`` (full layer names as :func:`sparsefw.pipeline.check_prunable` returns them).

    transformers 5 saves some models in their original checkpoint layout (Mixtral's fused experts
    as ``block_sparse_moe.experts.<e>.w1/w2/w3.weight``, Qwen3-MoE's as
    ``mlp.experts.<e>.gate_proj/up_proj/down_proj.weight``): the names come from transformers' own
    ``revert_weight_conversion`` applied to shape-only (meta) tensors. A fused tensor saved as is
    gives one ``name[e]`` per expert (:func:`split_tensor_name`)."""
    keys = sorted({split_tensor_name(tensor_name(n))[0] for n in layers})
    if not any(n.endswith("]") for n in layers):
        return keys
    params = dict(model.named_parameters())
    meta = {k: torch.empty(params[k].shape, device="meta") for k in keys}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        meta = revert_weight_conversion(model, meta)
    except ImportError:    # older transformers: saved as held in memory
        pass
    out = []
    for k in sorted(meta):
        v = meta[k]
        out += [f"{k}[{e}]" for e in range(v.shape[0])] if v.dim() == 3 else [k]
    return out


def checkpoint_to_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors read from a checkpoint (in its saved layout, e.g. Mixtral's per-expert
    ``block_sparse_moe.experts.<e>.w1/w2/w3.weight``) -> the model's parameter names and layout (the
    fused 3-D ``mlp.experts.gate_up_proj`` / ``down_proj``), with transformers' own load-time weight
    conversion (``conversion_mapping``: renamings, then at most one converter per key, as
    ``from_pretrained`` applies them). The forward twin of ``revert_weight_conversion``; a subset of
    the checkpoint (one decoder block) converts on its own because every converter merges tensors of
    one layer only.

    Args: model: the (meta) model the tensors are for. tensors: saved name -> tensor (any dtype).
    Returns: parameter name -> tensor (new tensors where converted, the inputs where only renamed).
    Raises: SparseFWError if transformers has no weight conversion (older than 5) and names differ."""
    try:
        from copy import deepcopy

        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (PrefixChange, WeightConverter, WeightRenaming,
                                                     dot_natural_key, rename_source_key)
    except ImportError:
        raise SparseFWError("this transformers has no weight conversion; stream a checkpoint whose "
                            "tensor names match the model's, or prune without --stream") from None
    conversions = [c for c in get_model_conversion_mapping(model) if not isinstance(c, PrefixChange)]
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, object] = {}
    for key, t in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        name, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            pattern = key
            conv = pending.setdefault(name, WeightRenaming(key, name))
        else:
            conv = pending.setdefault(name, deepcopy(by_pattern[pattern]))
        conv.add_tensor(name, key, pattern, t)
    out = {}
    for name, conv in pending.items():
        for target, t in conv.convert(name, model=model, config=model.config).items():
            out[target] = t[0] if isinstance(t, list) else t
    return out
