"""Inspect a checkpoint's sparsity from its safetensors files alone (plumbing; no model is built).

The pruned layers are the 2-D ``*.weight`` tensors inside numbered decoder blocks (a name with a
``.N.`` block index, e.g. ``model.layers.3.mlp.down_proj.weight``), i.e. the Linear layers that
``sparsefw prune`` prunes, and every expert's slice of fused 3-D expert tensors (experts, d_out,
d_in) such as ``model.layers.3.mlp.experts.down_proj``, reported as ``...down_proj[e]`` (MoE routers,
``...gate.weight``, are not pruned); embeddings, the LM head and 1-D norms are reported apart. For an N:M
pattern every group of M consecutive inputs of a row (along d_in, the semi-structured layout of
NVIDIA's sparse tensor cores and ``torch.sparse.to_sparse_semi_structured``) must hold at most N
nonzeros.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from .errors import SparseFWError
from .experts import EXPERT_PARAMS, ROUTER_NAMES, expert_layout
from .masks import parse_pattern
from .paths import HUB_ID

_BLOCK = re.compile(r"\.\d+\.")


def _resolve_folder(path: str) -> Path:
    """A local folder, or a hub id whose safetensors and JSON files are downloaded (cached)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise SparseFWError(f"'{path}' is a file; give the checkpoint folder (or a hub id)")

    if not HUB_ID.match(str(path)):
        raise SparseFWError(f"'{path}' does not exist; give a checkpoint folder or a hub id USER/NAME")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # noqa: BLE001 - offline or missing repo: one line
        raise SparseFWError(f"could not download '{path}' from the Hugging Face Hub ({type(e).__name__}); "
                            "give a local folder when offline") from None


@contextlib.contextmanager
def open_safetensors(path: str | Path):
    """``safetensors.safe_open(path, framework="pt")`` as a context manager whose failures (a corrupt
    or truncated file, while opening or reading a tensor) become one SparseFWError naming the file.

    Raises: SparseFWError saying to re-download or re-save the checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except SparseFWError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error types: one clear line
        raise SparseFWError(f"'{path}' is not a readable safetensors file ({type(e).__name__}): it is corrupt "
                            "or truncated; re-download or re-save the checkpoint") from None


def nm_violations(W: torch.Tensor, n: int, m: int) -> tuple[int, tuple[int, int] | None]:
    """Groups of ``m`` consecutive inputs with more than ``n`` nonzeros.

    Args: W: (d_out, d_in) tensor, d_in a multiple of m. Returns: (count of offending groups,
    (row, first column) of the first one or None). Raises SparseFWError if m does not divide d_in.
    """
    d_out, d_in = W.shape
    if d_in % m:
        raise SparseFWError(f"{n}:{m} needs d_in to be a multiple of {m}, got {d_in}")
    nz = (W != 0).view(d_out, d_in // m, m).sum(-1)
    bad = nz > n
    count = int(bad.sum())
    if not count:
        return 0, None
    r, g = (int(i) for i in bad.nonzero()[0])
    return count, (r, g * m)


def _pruned_parts(name: str, t: torch.Tensor, want: set | None, transposed: set):
    """(row name, 2-D weight (d_out, d_in)) of the pruned layers inside tensor ``name``: the tensor
    itself, or each expert's slice ``name[e]`` of a fused 3-D expert tensor (experts, d_out, d_in),
    transposed for the names in ``transposed`` (stored (experts, d_in, d_out))."""
    def slices(keep):
        return [(f"{name}[{e}]", t[e].t() if name in transposed else t[e]) for e in range(t.shape[0])
                if keep(f"{name}[{e}]")]
    if want is not None:
        if name in want:
            return [(name, t)]
        return slices(lambda n: n in want) if t.dim() == 3 else []
    if _BLOCK.search(name) is None:
        return []
    if t.dim() == 2 and name.endswith(".weight") and name.rsplit(".", 2)[-2] not in ROUTER_NAMES:
        return [(name, t)]
    if t.dim() == 3 and name.rsplit(".", 1)[-1] in EXPERT_PARAMS:
        return slices(lambda n: True)
    return []


def transposed_experts(shapes: dict[str, tuple]) -> set[str]:
    """Names of the fused 3-D expert tensors stored (experts, d_in, d_out) (gpt-oss), from the shapes
    of every ``<prefix>.gate_up_proj`` (or ``up_proj``) and its ``<prefix>.down_proj``
    (:func:`sparsefw.experts.expert_layout`). shapes: tensor name -> shape."""
    out = set()
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        down = shapes.get(f"{prefix}.down_proj")
        if leaf in ("gate_up_proj", "up_proj") and down is not None and \
                expert_layout(tuple(shape), tuple(down), leaf == "gate_up_proj") == "transposed":
            out |= {name, f"{prefix}.down_proj"}
    return out


def inspect_checkpoint(path: str | Path, pattern: str | None = None, names=None) -> dict:
    """Sparsity of every pruned layer of a saved checkpoint, from its safetensors files.

    Args:
        path: a folder with ``*.safetensors`` (``save_pretrained`` output) or a hub id.
        pattern: ``"N:M"`` to check in every pruned layer (e.g. ``"2:4"``), or None.
        names: the state-dict names of the pruned tensors when known (the pipeline passes them;
            ``key[e]`` = expert e of a fused 3-D tensor); None = every 2-D ``*.weight`` inside a
            numbered block and every expert of its fused 3-D expert tensors (see the module docstring).
    Returns: JSON-able dict {"path", "files", "bytes" (size on disk of the safetensors), "dtypes"
        {dtype: tensors}, "layers": [{"name", "shape", "dtype", "zeros", "numel", "sparsity"
        [, "nm_violations", "nm_first"]}], "pruned_layers", "zeros", "total", "sparsity" (over the
        pruned layers), "expert_layers", "expert_zeros", "expert_total", "expert_sparsity" (the
        expert slices among them), "other_tensors", "other_sparsity", "pattern", "pattern_holds" (bool or
        None), "pattern_failing_layers"}.
    Raises: SparseFWError: no such folder / hub id, no safetensors in it, bad pattern, a
        pattern that does not divide a layer's d_in, or a name of ``names`` not in the files.
    """
    folder = _resolve_folder(str(path))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SparseFWError(f"no .safetensors files in '{folder}'; give a save_pretrained folder")
    nm = None
    if pattern:
        p = parse_pattern(pattern) if ":" in str(pattern) else None
        if p is None:
            raise SparseFWError(f"--pattern for inspect must be N:M (e.g. 2:4), got '{pattern}'")
        nm = (p.n, p.m)
    want = None if names is None else set(names)
    layers, dtypes = [], {}
    other = other_zeros = 0
    shapes = {}
    for f in files:
        with open_safetensors(f) as fh:
            shapes.update({n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()})
    transposed = transposed_experts(shapes)
    for f in files:
        with open_safetensors(f) as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                dt = str(t.dtype).replace("torch.", "")
                dtypes[dt] = dtypes.get(dt, 0) + 1
                parts = _pruned_parts(name, t, want, transposed)
                for rname, w in parts:
                    z = int((w == 0).sum())
                    row = {"name": rname, "shape": list(w.shape), "dtype": dt, "zeros": z, "numel": w.numel(),
                           "sparsity": z / max(w.numel(), 1)}
                    if nm:
                        row["nm_violations"], row["nm_first"] = nm_violations(w, *nm)
                    layers.append(row)
                covered = sum(w.numel() for _, w in parts)
                if covered < t.numel():            # the rest of the tensor (all of it when nothing is pruned)
                    other += t.numel() - covered
                    other_zeros += int((t == 0).sum()) - sum(r["zeros"] for r in layers[len(layers) - len(parts):])
    missing = (want or set()) - {r["name"] for r in layers}
    if missing:
        raise SparseFWError(f"{len(missing)} pruned tensors are missing from the saved files, e.g. {sorted(missing)[0]}")
    zeros = sum(r["zeros"] for r in layers)
    total = sum(r["numel"] for r in layers)
    experts = [r for r in layers if r["name"].endswith("]") or ".experts." in r["name"]]
    expert_zeros, expert_total = sum(r["zeros"] for r in experts), sum(r["numel"] for r in experts)
    failing = [r["name"] for r in layers if r.get("nm_violations")]
    return {"path": str(folder), "files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
            "dtypes": dtypes, "layers": layers, "pruned_layers": len(layers), "zeros": zeros, "total": total,
            "sparsity": zeros / max(total, 1), "expert_layers": len(experts), "expert_zeros": expert_zeros,
            "expert_total": expert_total, "expert_sparsity": expert_zeros / max(expert_total, 1),
            "other_tensors": other,
            "other_sparsity": other_zeros / max(other, 1), "pattern": pattern,
            "pattern_holds": (not failing) if nm else None, "pattern_failing_layers": failing}


def inspection_summary(info: dict) -> dict:
    """:func:`inspect_checkpoint`'s result without the per-layer list and the local path (what
    report.json keeps under ``"checkpoint"``, and the model card shows)."""
    return {k: v for k, v in info.items() if k not in ("layers", "path")}


def format_inspection(info: dict, per_layer: bool = True) -> str:
    """Text report of :func:`inspect_checkpoint`: total, the N:M verdict, optionally every layer."""
    lines = [f"{info['pruned_layers']} pruned layers: sparsity {info['sparsity']:.4f} "
             f"({info['zeros']:,} zeros of {info['total']:,} weights); other tensors "
             f"{info['other_tensors']:,} weights, sparsity {info['other_sparsity']:.4f}",
             f"dtype {', '.join(f'{k} ({v} tensors)' for k, v in info['dtypes'].items())}; "
             f"{len(info['files'])} safetensors file(s), {info['bytes']:,} bytes on disk"]
    if info.get("expert_layers"):
        lines.insert(1, f"of which {info['expert_layers']} are MoE expert weights: sparsity "
                        f"{info['expert_sparsity']:.4f} ({info['expert_zeros']:,} zeros of {info['expert_total']:,})")
    if info.get("pattern"):
        if info["pattern_holds"]:
            lines.append(f"{info['pattern']} holds in all {info['pruned_layers']} layers")
        else:
            bad = info["pattern_failing_layers"]
            detail = {r["name"]: f" ({r['nm_violations']} groups, first at row {r['nm_first'][0]}, column "
                                 f"{r['nm_first'][1]})" for r in info.get("layers", []) if r.get("nm_violations")}
            lines.append(f"{info['pattern']} FAILS in {len(bad)} of {info['pruned_layers']} layers: "
                         + ", ".join(n + detail.get(n, "") for n in bad))
    if per_layer and "layers" in info:
        lines += [f"  {r['sparsity']:.4f}  {r['dtype']:>8}  {'x'.join(map(str, r['shape'])):>11}  {r['name']}"
                  for r in info["layers"]]
    return "\n".join(lines)
