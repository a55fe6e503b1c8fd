"""Streaming prune for checkpoints larger than host memory (model plumbing).

The model is built on the meta device (accelerate's ``init_empty_weights``); only the modules that
run before the first block are read from the checkpoint. Each decoder block is read from the
checkpoint's safetensors shards (``safe_open``) when it is reached, put on the compute device with
accelerate's ``set_module_tensor_to_device``, pruned by the same driver as the in-memory run
(:func:`sparsefw.pipeline.prune_model`), written to its own output shard and dropped back to meta.
The tensors outside the blocks (embeddings, norms, LM head) are copied from the checkpoint as they
are. The output is a normal sharded checkpoint (``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json``) that ``AutoModelForCausalLM.from_pretrained`` loads, with the
same tensors as the in-memory run.

Peak memory: one block's weights + the calibration activations + the block's Gram matrices and
solver state (README, "Scale"). The embeddings are read for the first pass only (the capture of the
first block's inputs) and dropped back to meta after it.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from .errors import SparseFWError
from .inspection import open_safetensors
from .models import decoder_blocks, resolve_dtype, resolve_model

REST_SHARD_BYTES = 1 << 29
"""Most bytes (512 MiB) of one output shard of the tensors outside the blocks (embeddings, final norm,
LM head); a larger tensor gets a shard of its own. The shards are read, converted and written one at
a time: writing one costs ~3x its bytes (the checkpoint's pages that ``safe_open`` maps, the tensors
read from them, safetensors' serialised copy), so the end of a streamed run holds ~3 x the largest
shard, not 3 x all the tensors outside the blocks (README, "Scale")."""

_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}

_CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                     "added_tokens.json", "chat_template.jinja")


def checkpoint_folder(name_or_path: str) -> Path:
    """A local folder with the checkpoint's safetensors: packaged models and folders as they are,
    hub ids through ``huggingface_hub.snapshot_download`` (config, tokenizer and safetensors only).

    Raises: SparseFWError if there is no such folder, no safetensors in it, or the hub is
    unreachable."""
    src = resolve_model(name_or_path)
    p = Path(src).expanduser()
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                            "*.txt", "*.jinja"]))
        except Exception as e:  # noqa: BLE001 - offline, no such repo: one clear message
            raise SparseFWError(f"streaming needs a local checkpoint folder or a reachable hub id; "
                                f"'{name_or_path}' is neither ({type(e).__name__})") from None
    if not list(p.glob("*.safetensors")):
        raise SparseFWError(f"checkpoint folder '{p}' has no .safetensors files; streaming reads "
                            "safetensors shards (save the model with save_pretrained first)")
    return p


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from ``model.safetensors.index.json`` or the files."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open_safetensors(f) as fh:
            out.update({k: f.name for k in fh.keys()})
    return out


class _Reader:
    """Reads named tensors from the checkpoint's shards, one open file at a time."""

    def __init__(self, folder: Path, wmap: dict[str, str]):
        self.folder, self.wmap = folder, wmap

    def _by_file(self, names: list[str]):
        """(open shard, its names among ``names``), one shard open at a time."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.wmap[n], []).append(n)
        for fname, ns in by_file.items():
            with open_safetensors(self.folder / fname) as fh:
                yield fh, ns

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.wmap]
        if missing:
            raise SparseFWError(f"tensor '{missing[0]}' is not in the checkpoint's safetensors; the "
                                "checkpoint does not match its config")
        return {n: fh.get_tensor(n) for fh, ns in self._by_file(names) for n in ns}

    def nbytes(self, names: list[str]) -> dict[str, int]:
        """Bytes of each named tensor, from the shards' headers (no tensor is read)."""
        out = {}
        for fh, ns in self._by_file(names):
            for n in ns:
                sl = fh.get_slice(n)
                out[n] = math.prod(sl.get_shape()) * _ITEMSIZE.get(sl.get_dtype(), 1)
        return out


def rest_groups(sizes: dict[str, int], limit: int | None = None) -> list[list[str]]:
    """Consecutive groups of tensor names (in the given order) of at most ``limit`` bytes each
    (default :data:`REST_SHARD_BYTES`); a tensor larger than ``limit`` is a group of its own.
    sizes: name -> bytes."""
    limit = REST_SHARD_BYTES if limit is None else limit
    groups: list[list[str]] = []
    total = 0
    for n, b in sizes.items():
        if not groups or total + b > limit:
            groups.append([])
            total = 0
        groups[-1].append(n)
        total += b
    return groups


def _materialize(model, names: list[str], reader: _Reader, device, dtype, tensors: dict | None = None) -> None:
    """Put the model's tensors ``names`` on ``device`` (floating point ones in ``dtype``), read from
    the checkpoint, or taken from ``tensors`` (name -> tensor) when given."""
    from accelerate.utils import set_module_tensor_to_device

    tensors = reader.read(names) if tensors is None else tensors
    for n in names:
        t = tensors[n]
        set_module_tensor_to_device(model, n, device, value=t, dtype=dtype if t.is_floating_point() else None)


def _read_block(model, pre: str, names: list[str], reader: _Reader, device, dtype) -> bool:
    """Read one block's tensors ``names`` (model names under ``pre``) onto ``device``. A block saved
    in another layout than the model holds it (fused MoE experts saved per expert) goes through
    transformers' weight conversion. Returns whether it did."""
    if all(n in reader.wmap for n in names):
        _materialize(model, names, reader, device, dtype)
        return False
    from .experts import checkpoint_to_model_tensors

    keys = [k for k in reader.wmap if k.startswith(pre + ".")]
    tensors = checkpoint_to_model_tensors(model, reader.read(keys))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SparseFWError(f"tensor '{missing[0]}' is neither in the checkpoint's safetensors nor made by "
                            "transformers' weight conversion from them; the checkpoint does not match its config")
    _materialize(model, names, reader, device, dtype, tensors)
    return True


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the OS. Its mmap threshold grows with every
    large free (up to 32 MiB), after which a block's freed tensors stay in the heap: measured with
    scripts/bench_memory.py, the streaming peak was 1168 MiB above the imports with the default
    and 484 MiB with the threshold fixed at 64 KiB (M_MMAP_THRESHOLD, as the environment variable
    MALLOC_MMAP_THRESHOLD_=65536 does). No-op where libc has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _load_empty(folder: Path, cfg):
    """(model on the meta device, tokenizer, dtype) of the checkpoint in ``folder``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    dtype = resolve_dtype(cfg.dtype)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tok, dtype


def _write_rest(stage: Path, folder: Path, reader: _Reader, groups: list[list[str]], out_map: dict, shards: list[str],
                dtype, config_updates: dict | None = None) -> None:
    """Write the tensors outside the blocks (as they are, in ``dtype``), group i to ``shards[i]``, one
    group in memory at a time (:data:`REST_SHARD_BYTES`); then the index, the tokenizer and config
    files (config's dtype = the one written, and ``config_updates``, e.g. the expert counts after
    ``--drop-experts``)."""
    from safetensors.torch import save_file

    for names, shard in zip(groups, shards):
        tensors = {n: (t.to(dtype) if t.is_floating_point() else t).contiguous() for n, t in reader.read(names).items()}
        save_file(tensors, str(stage / shard), metadata={"format": "pt"})
        out_map.update({n: shard for n in tensors})
        del tensors
        _return_freed_memory()
    total = sum((stage / f).stat().st_size for f in set(out_map.values()))
    (stage / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(out_map.items()))}, indent=2))
    for f in _CHECKPOINT_FILES:
        if (folder / f).exists():
            shutil.copy2(folder / f, stage / f)
    c = json.loads((stage / "config.json").read_text())   # the dtype the tensors were written in
    c.update(config_updates or {})
    c["dtype"] = str(dtype).replace("torch.", "")
    c.pop("torch_dtype", None)
    (stage / "config.json").write_text(json.dumps(c, indent=2))


def _block_context(model, names: dict, reader: _Reader, device, dtype, stage, shard, out_map: dict):
    """The ``block_context`` of :func:`sparsefw.pipeline.prune_model` for streaming: read the
    block from the checkpoint onto ``device``, and afterwards write it to its own shard (unless
    ``write=False``: OWL's read-only pass) in the checkpoint's layout and drop it back to meta.
    ``names``: module id -> full name (:func:`sparsefw.capture.full_names`)."""
    from safetensors.torch import save_file

    @contextlib.contextmanager
    def block_context(bi, block, write=True):
        pre = names[id(block)]
        converted = _read_block(model, pre, [f"{pre}.{n}" for n in block.state_dict()], reader, device, dtype)
        for n, b in block.named_buffers():   # non-persistent buffers (rotary) are built on meta
            if b.device.type == "meta":
                raise SparseFWError(f"buffer {pre}.{n} cannot be streamed; use the in-memory run")
        block.to(device)
        yield block
        if stage is not None and write:
            sd = {f"{pre}.{n}": p.detach().to("cpu") for n, p in block.state_dict().items()}
            if converted:        # back to the saved layout, as save_pretrained writes it
                from transformers.core_model_loading import revert_weight_conversion

                sd = revert_weight_conversion(model, sd)
            sd = {n: t.contiguous() for n, t in sd.items()}
            save_file(sd, str(stage / shard(bi)), metadata={"format": "pt"})
            out_map.update({n: shard(bi) for n in sd})
        block.to("meta")
    return block_context


def stream_prune(model_name: str, output: str, cfg, overwrite: bool = False, progress: bool = True,
                 pattern=None, resume: bool = False) -> dict:
    """Prune a checkpoint block by block without ever holding it in memory; write the result.

    Args:
        model_name: packaged name, local folder with safetensors, or hub id.
        output: the output folder (written atomically, :func:`sparsefw.saving.staged_output`).
        cfg: :class:`sparsefw.config.PruneConfig` (``dtype`` auto = the checkpoint's).
        overwrite: replace a non-empty output folder. progress: tqdm bars.
        pattern: ``cfg.validate()``'s result if the caller ran it (else it runs here).
        resume: continue an interrupted run (:mod:`sparsefw.resume`).
    Returns: the report dict (also written as ``report.json``).
    Raises: SparseFWError as :func:`sparsefw.pipeline.prune_model`, and for checkpoints without
        safetensors or whose tensors do not match the config.
    """
    from .capture import full_names
    from .distributed import barrier, broadcast_object, init_ranks
    from .onload import outside_modules
    from .experts import saved_tensor_names
    from .pipeline import check_prunable, prune_model
    from .report import run_report
    from .resume import run_state
    from .saving import staged_output, write_report

    t0 = time.perf_counter()
    pattern = pattern or cfg.validate()
    _return_freed_memory()
    ranks = init_ranks(cfg.device)
    folder = checkpoint_folder(model_name)
    model, tok, dtype = _load_empty(folder, cfg)
    blocks = decoder_blocks(model)
    names = check_prunable(model, pattern, cfg.skip_unknown)
    state = run_state(model_name, cfg, output, ranks, resume, overwrite)
    wmap = weight_map(folder)
    reader = _Reader(folder, wmap)
    device = ranks.device
    outside = outside_modules(model, blocks, model.get_output_embeddings())
    module_names = full_names(model)
    _materialize(model, [f"{p}.{n}" for m in outside for p in [module_names[id(m)]]
                         for n, _ in m.named_parameters() if f"{p}.{n}" in wmap], reader, device, dtype)
    for m in outside:
        m.to(device)
    prefixes = tuple(f"{module_names[id(b)]}." for b in blocks)
    groups = rest_groups(reader.nbytes([k for k in wmap if not k.startswith(prefixes)]))
    nshards = len(blocks) + len(groups)

    def shard(i):
        return f"model-{i + 1:05d}-of-{nshards:05d}.safetensors"

    out_map: dict[str, str] = {}
    report = None
    with contextlib.ExitStack() as stack:
        stage = stack.enter_context(staged_output(output, overwrite)) if ranks.is_main else None
        def drop_outside():          # embeddings etc. are read from the checkpoint again when written
            for m in outside:
                m.to("meta")
            _return_freed_memory()

        res = prune_model(model, tok, cfg, progress=progress, ranks=ranks, pattern=pattern, state=state,
                          block_context=_block_context(model, module_names, reader, device, dtype, stage, shard, out_map),
                          after_capture=drop_outside)
        if res["dropped_experts"]:     # the layers left after --drop-experts
            names = check_prunable(model, pattern, cfg.skip_unknown)
        if stage is not None:
            _write_rest(stage, folder, reader, groups, out_map, [shard(len(blocks) + i) for i in range(len(groups))],
                        dtype, res["experts_config"])
            report = run_report(model_name, cfg, device, dtype, res, t0, stream=True)
            write_report(stage, report, saved_tensor_names(model, names))
    barrier(ranks)
    state.remove()
    return broadcast_object(report, 0, ranks)
