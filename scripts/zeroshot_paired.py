"""zero-shot accuracy on the same first 500 documents of each task, with standard
errors and paired per-document differences.

Reads the per-document shards written by ``sparsefw eval-zeroshot --resume-dir`` (one folder per
model, ``<task>/<first>-<end>.json`` with a 0/1 ``acc`` and, where the task has it, ``acc_norm`` per
document).

Statistics (documents are the units): a model's accuracy on a task is the mean of its n per-document
0/1 scores, its standard error s/√n (s the sample standard deviation); the 7-task mean is the mean
of the task accuracies with standard error √(Σ SE_t²)/7; the mean of 4 is the same over the four
4-choice tasks (HellaSwag, ARC-Easy, ARC-Challenge, OpenBookQA; chance 25%), since models of this size
score the binary BoolQ, RTE and Winogrande near chance or BoolQ's share of "yes" answers (62%), where
a pruned model can gain by answering one way more often. A paired difference between models A and B
is the mean of d_i = a_i − b_i over the same documents, with standard error sd(d)/√n (for the
7-task mean, combined as above; "pooled" treats all documents of the seven tasks as one sample);
z = difference / SE (|z| > 2: unlikely to be noise).

Two modes:

- ``--config configs/results_smollm2.yaml``: the dense model and every cell the config saves
  (``save:``, checkpoints under ``<output>/models/<cell id>``, written by ``sparsefw compare``; one
  that is missing, as in a fresh clone, is pruned again and checked against its cell) are
  scored (resumably, shards of ``--shard-size`` documents under ``<output>/zeroshot/<cell id>``,
  claimed one at a time, so two processes on the same config share the work; ``--report-only``
  scores nothing); per sparsity, the accuracy table and the paired differences of each of ours
  (``sparsefw`` / ``swaps`` cells) minus the others and dense go to ``<output>/zeroshot.{md,json}``.
- no ``--config``: the folders of scripts/zeroshot60.sh (60%, 2026-12-03) -> ``zeroshot60.{md,json}``
  in the folder given (default ``results/zeroshot60_smollm2``).

    OMP_NUM_THREADS=1 python scripts/zeroshot_paired.py --config configs/results_smollm2.yaml
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import yaml

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
MODELS = {"dense": "results/zeroshot_dense_smollm2", "Wanda": "results/zeroshot60_smollm2/wanda",
          "SparseGPT": "results/zeroshot60_smollm2/sparsegpt",
          "SparseFW + rec": "results/zeroshot60_smollm2/sparsefw_rec"}
N_DOCS = 500
ROOT = Path(__file__).resolve().parent.parent
OURS = ("sparsefw", "swaps")    # methods whose cells are the bases of the paired differences
FOUR_CHOICE = ("hellaswag", "arc_easy", "arc_challenge", "openbookqa")   # the "mean of 4" tasks (chance 25%)


def scores(folder: Path, task: str, metric: str, n: int = N_DOCS) -> list[float] | None:
    """The per-document 0/1 scores of documents 0..n−1 (or all, if the task has fewer), from the
    shards in ``folder/task``; None if the metric is absent. Raises FileNotFoundError if a shard is
    missing."""
    got: dict[int, float] = {}
    shards = sorted((folder / task).glob("*.json"))
    if not shards:
        raise FileNotFoundError(f"{folder / task}: no scored shard")
    for f in shards:
        sh = json.loads(f.read_text())
        if metric not in sh["metrics"]:
            return None
        for i, v in enumerate(sh["metrics"][metric]):
            got[sh["first"] + i] = v
        total = sh["n_docs"]
    want = min(n, total)
    if any(i not in got for i in range(want)):
        raise FileNotFoundError(f"{folder / task}: documents 0..{want - 1} are not all scored")
    return [got[i] for i in range(want)]


def mean_se(x: list[float]) -> tuple[float, float]:
    return statistics.fmean(x), statistics.stdev(x) / math.sqrt(len(x))


def task_mean(values: list[float], ses: list[float], tasks=TASKS) -> tuple[float, float]:
    """Mean over ``tasks`` of per-task numbers given in TASKS order, and its standard error
    √(Σ SE_t²)/T (the tasks' documents are independent samples)."""
    pick = [(v, s) for t, v, s in zip(TASKS, values, ses) if t in tasks]
    return statistics.fmean(v for v, _ in pick), math.sqrt(sum(s * s for _, s in pick)) / len(pick)


def build(models: dict[str, Path], bases: list[str], others: list[str], n: int = N_DOCS) -> tuple[str, dict]:
    """Markdown (accuracy table, then paired differences of each base minus each other model) over
    the first ``n`` documents of each task, and the same numbers as a dict. Raises
    FileNotFoundError if a model's shards are incomplete."""
    out: dict = {"n_docs_per_task": {}, "acc": {}, "paired": {}}
    lines = ["| model | " + " | ".join(TASKS) + " | mean of 7 | mean of 4 |", "|---" * (len(TASKS) + 3) + "|"]
    for name, folder in models.items():
        row, accs, ses = [], [], []
        for t in TASKS:
            x = scores(folder, t, "acc", n)
            out["n_docs_per_task"][t] = len(x)
            m, se = mean_se(x)
            accs.append(m)
            ses.append(se)
            row.append(f"{100 * m:.1f} ± {100 * se:.1f}")
        (mean, se), (m4, se4) = task_mean(accs, ses), task_mean(accs, ses, FOUR_CHOICE)
        out["acc"][name] = {"tasks": dict(zip(TASKS, accs)), "se": dict(zip(TASKS, ses)), "mean": mean, "mean_se": se,
                            "mean4": m4, "mean4_se": se4}
        lines.append(f"| {name} | " + " | ".join(row) + f" | **{100 * mean:.2f} ± {100 * se:.2f}** "
                     f"| {100 * m4:.2f} ± {100 * se4:.2f} |")
    for base in bases:
        lines += ["", f"Paired per-document differences, {base} minus each other model (percentage points, ± SE; z):",
                  "", "| metric | vs | " + " | ".join(TASKS) + " | mean of 7 | mean of 4 | pooled documents |",
                  "|---" * (len(TASKS) + 5) + "|"]
        lines += _paired_rows(models, base, [o for o in others if o != base], out, n)
    return "\n".join(lines) + "\n", out


def _z(d: float, se: float) -> str:
    """``z = d / se`` for the tables; "identical" where every paired difference is 0 (se 0)."""
    return f"z = {d / se:+.1f}" if se else "identical"


def _paired_rows(models: dict[str, Path], base: str, others: list[str], out: dict, n: int) -> list[str]:
    """Table rows of the paired differences ``base`` minus each of ``others`` (acc, then acc_norm);
    the numbers also go to ``out["paired"]``."""
    lines = []
    for metric in ("acc", "acc_norm"):
        for other in others:
            row, ds, ses, pooled = [], [], [], []
            for t in TASKS:
                a, b = scores(models[base], t, metric, n), scores(models[other], t, metric, n)
                if a is None or b is None:   # no acc_norm: the task's acc
                    a, b = scores(models[base], t, "acc", n), scores(models[other], t, "acc", n)
                diff = [x - y for x, y in zip(a, b)]
                pooled += diff
                d, se = mean_se(diff)
                ds.append(d)
                ses.append(se)
                row.append(f"{100 * d:+.1f} ± {100 * se:.1f}")
            (d, se), (d4, se4) = task_mean(ds, ses), task_mean(ds, ses, FOUR_CHOICE)
            pd, pse = mean_se(pooled)
            out["paired"][f"{metric}: {base} - {other}"] = {
                "tasks": dict(zip(TASKS, ds)), "se": dict(zip(TASKS, ses)), "mean": d, "mean_se": se,
                "z": d / se if se else None, "mean4": d4, "mean4_se": se4, "z4": d4 / se4 if se4 else None,
                "pooled": pd, "pooled_se": pse, "pooled_n": len(pooled),
                "pooled_z": pd / pse if pse else None}
            lines.append(f"| {metric} | {other} | " + " | ".join(row)
                         + f" | **{100 * d:+.2f} ± {100 * se:.2f}** ({_z(d, se)}) "
                         f"| {100 * d4:+.2f} ± {100 * se4:.2f} ({_z(d4, se4)}) "
                         f"| {100 * pd:+.2f} ± {100 * pse:.2f} ({_z(pd, pse)}, n = {len(pooled)}) |")
    return lines


def scored(folder: Path, n: int) -> bool:
    """True if ``folder`` holds the scores of the first ``n`` documents of every task."""
    try:
        return all(scores(folder, t, "acc", n) is not None for t in TASKS)
    except FileNotFoundError:
        return False


def score(model: str, folder: Path, limit: int, batch_size: int, shard_size: int = 100) -> None:
    """Score ``model`` (a packaged name or checkpoint folder) on the first ``limit`` documents of
    each of TASKS into ``folder`` (``sparsefw.api.eval_zeroshot`` with ``resume_dir``: shards of
    ``shard_size`` documents, each claimed with a lock, finished ones read back).

    The first process on a model takes the tasks in order, the next one (finding the first's
    ``folder/forward.lock``) in reverse: two workers then share the shards of one task only, where
    they meet, instead of one waiting for the other's last shard of every task. Raises what
    eval_zeroshot raises (SparseFWError for an unloadable model)."""
    from sparsefw.api import eval_zeroshot
    from sparsefw.paths import claim

    folder.mkdir(parents=True, exist_ok=True)
    first = claim(folder / "forward.json")
    try:
        eval_zeroshot(str(model), list(TASKS) if first else list(reversed(TASKS)), limit=limit,
                      batch_size=batch_size, resume_dir=str(folder), shard_size=shard_size)
    finally:
        if first is not None:
            first.unlink(missing_ok=True)


def wait_or_claim(done: Path, lock_for: Path, poll: float | None = 10.0) -> Path | None:
    """Claim the job that makes ``done`` (a file): the lock (``sparsefw.paths.claim`` on
    ``lock_for``, i.e. ``<lock_for stem>.lock``; delete it when finished), or None once ``done``
    exists. While another live process holds the lock, polls every ``poll`` seconds (``poll=None``:
    returns None at once). Lets workers share one-off jobs (re-pruning a checkpoint, pruning a mask)
    without doing them twice."""
    import time

    from sparsefw.paths import claim

    while not done.exists():
        lock = claim(lock_for)
        if lock is not None:
            if not done.exists():          # not finished by the holder just before we claimed
                return lock
            lock.unlink(missing_ok=True)
            break
        if poll is None:
            break
        time.sleep(poll)
    return None


def checkpoint(config: str, out: Path, cid: str, cell: dict, wait: bool = True) -> Path | None:
    """The pruned checkpoint of the finished, saved cell ``cid``: ``<out>/models/<cid>``.

    Checkpoints are not kept in git, so a fresh clone has the cell files only: a missing checkpoint
    is pruned again from the config (``sparsefw compare --cell``, into a scratch folder beside it),
    its test perplexity compared with the one the cell records and only then moved into place; both
    numbers go to ``<out>/zeroshot/<cid>/checkpoint.json`` and the zero-shot report lists them. On the
    machine (CPU model) that made the cell and one thread, the numbers are equal bit for bit; another
    CPU sums in another order, flips near-tied weights and lands elsewhere within the calibration-seed
    spread, so the config's ``reprune_rtol`` (relative, default 1e-6: the same machine) says how far
    apart they may be (results configs: 0.03, about two seed standard deviations at 60%). A process
    that finds another one re-pruning the same cell waits for it (``wait=False``: returns None at
    once instead).

    Raises: RuntimeError if the re-pruned perplexity differs from the recorded one by more than
    ``reprune_rtol`` (not the same cell: check the config, or rerun the cell with ``sparsefw compare``
    and score that).
    """
    import os
    import shutil
    import sys
    import time

    sys.path.insert(0, str(ROOT))
    from sparsefw.compare import run_compare
    from sparsefw.paths import write_atomic

    dest = out / "models" / cid
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = wait_or_claim(dest / "config.json", dest.with_name(f"{cid}.regen"),    # lock file <cid>.lock
                         poll=10.0 if wait else None)
    if lock is not None:
        try:
            scratch = dest.with_name(f".regen-{cid}")
            shutil.rmtree(scratch, ignore_errors=True)
            print(f"{cid}: checkpoint missing, pruning the cell again into {scratch}", flush=True)
            t0 = time.perf_counter()
            again = run_compare(config, output=str(scratch), only=[cid])["cells"][cid]
            rtol = float((yaml.safe_load(Path(config).read_text()) or {}).get("reprune_rtol", 1e-6))
            rel = abs(again["ppl"] - cell["ppl"]) / cell["ppl"]
            write_atomic(out / "zeroshot" / cid / "checkpoint.json", json.dumps(
                {"cell": cid, "ppl_recorded": cell["ppl"], "ppl_reproduced": again["ppl"], "same": rel <= 1e-6,
                 "rel_diff": rel, "rtol": rtol, "accepted": rel <= rtol, "code_recorded": cell.get("code"),
                 "code_reproduced": again.get("code"), "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
            if rel > rtol:
                raise RuntimeError(f"{cid}: pruned again, test perplexity {again['ppl']!r} but the cell records "
                                   f"{cell['ppl']!r} ({100 * rel:.2g}% apart, more than reprune_rtol {rtol:g}); "
                                   f"this is not the cell's checkpoint. Rerun the cell: "
                                   f"sparsefw compare --config {config} --cell {cid}")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(scratch / "models" / cid, dest)
            shutil.rmtree(scratch, ignore_errors=True)
        finally:
            lock.unlink(missing_ok=True)
    return dest if (dest / "config.json").is_file() else None


def _config_models(config: str, limit: int, batch_size: int | None, report_only: bool,
                   shard_size: int = 100) -> tuple[Path, dict, set]:
    """Score (resumably) the dense model and the finished cells a results config saves, in shards of
    ``shard_size`` documents that several processes share (each claims a shard), ``batch_size``
    documents' requests at a time (None: the config's ``zeroshot_batch_size``, else 16; a large
    vocabulary needs fewer, the logits being batch × tokens × vocabulary floats). Returns the
    config's output folder, {sparsity: {name: shard folder}} (dense in every group) and the names
    of our cells (method sparsefw or swaps)."""
    import sys
    import time

    sys.path.insert(0, str(ROOT))
    from sparsefw.compare import finished_cells

    c, out, cells = finished_cells(config, base=ROOT)
    batch_size = batch_size or int(c.get("zeroshot_batch_size", 16))
    saved = [cid for cid, cell in cells.items() if cid in set(c.get("save") or []) and cell is not None]
    pending = [] if report_only else [cid for cid in ["dense"] + saved if not scored(out / "zeroshot" / cid, limit)]
    # checkpoints on disk first (a new session's disk may lack them: re-pruning one takes minutes), and
    # a checkpoint another worker is re-pruning is left until later, so no worker waits for another
    pending.sort(key=lambda cid: cid != "dense" and not (out / "models" / cid / "config.json").is_file())
    while pending:
        for cid in list(pending):
            model = c["model"] if cid == "dense" else checkpoint(config, out, cid, cells[cid], wait=False)
            if model is not None:
                score(model, out / "zeroshot" / cid, limit, batch_size, shard_size)
                pending.remove(cid)
        if pending:
            time.sleep(10)
    groups: dict[str, dict] = {}
    for cid in saved:
        folder = out / "zeroshot" / cid
        if not scored(folder, limit):
            print(f"{cid}: not scored yet, left out")
            continue
        groups.setdefault(cells[cid]["sparsity"], {"dense": out / "zeroshot" / "dense"})[cid] = folder
    return out, groups, {cid for cid in saved if cells[cid]["method"] in OURS}


def reprune_note(out: Path, cids: list[str]) -> str:
    """Markdown table of the scored checkpoints that were pruned again (``checkpoint``): the test
    perplexity the cell records beside that of the checkpoint scored; "" if none was."""
    rows = []
    for cid in cids:
        f = out / "zeroshot" / cid / "checkpoint.json"
        if f.is_file():
            r = json.loads(f.read_text())
            rel = abs(r["ppl_reproduced"] - r["ppl_recorded"]) / r["ppl_recorded"]
            rows.append(f"| {cid} | {r['ppl_recorded']:.2f} | {r['ppl_reproduced']:.2f} | "
                        + ("same bit for bit" if rel <= 1e-6 else f"{100 * rel:.1f}% apart") + " |")
    if not rows:
        return ""
    return ("Checkpoints pruned again from their cell's config before scoring (test perplexity; on another CPU "
            "than the cell's the mask differs within the seed spread):\n\n| cell | cell's ppl | scored checkpoint's "
            "ppl | |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(ROOT / "results/zeroshot60_smollm2"),
                    help="without --config: where zeroshot60.{md,json} go")
    ap.add_argument("--config", help="a results config whose saved cells are scored and compared")
    ap.add_argument("--limit", type=int, default=N_DOCS, help="documents per task (default 500)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="lm-eval batch size (default: the config's zeroshot_batch_size, else 16)")
    ap.add_argument("--shard-size", type=int, default=100,
                    help="documents per shard (--config); processes running the same config share the shards")
    ap.add_argument("--report-only", action="store_true", help="score nothing; tables from the shards")
    a = ap.parse_args(argv)
    if not a.config:
        md, out = build({k: ROOT / v for k, v in MODELS.items()}, ["SparseFW + rec"], ["Wanda", "SparseGPT", "dense"])
        name, out_dir = "zeroshot60", Path(a.folder)
    else:
        out_dir, groups, ours = _config_models(a.config, a.limit, a.batch_size, a.report_only,
                                               a.shard_size)
        md, out, name = "", {}, "zeroshot"
        for sp, models in groups.items():
            part, out[sp] = build(models, [m for m in models if m in ours], [m for m in models if m not in ours],
                                  a.limit)
            md += f"### {sp}\n\n{part}\n"
        md += reprune_note(out_dir, [m for models in groups.values() for m in models])
    (out_dir / f"{name}.md").write_text(md)
    (out_dir / f"{name}.json").write_text(json.dumps(out, indent=1))
    print(md)


if __name__ == "__main__":
    main()
