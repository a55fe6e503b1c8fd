"""zero-shot accuracy on the same first 500 documents of each task, with standard
errors and paired per-document differences.

Reads the per-document shards written by ``sparsefw eval-zeroshot --resume-dir`` (one folder per
model, ``<task>/<first>-<end>.json`` with a 0/1 ``acc`` and, where the task has it, ``acc_norm`` per
document) and writes ``zeroshot60.md`` / ``zeroshot60.json`` into the output folder.

Statistics (documents are the units): a model's accuracy on a task is the mean of its n per-document
0/1 scores, its standard error s/√n (s the sample standard deviation); the 7-task mean is the mean
of the task accuracies with standard error √(Σ SE_t²)/7. A paired difference between models A and B
is the mean of d_i = a_i − b_i over the same documents, with standard error sd(d)/√n (for the
7-task mean, combined as above; "pooled" treats all documents of the seven tasks as one sample);
z = difference / SE (|z| > 2: unlikely to be noise).

    python scripts/zeroshot_paired.py            # the folders of scripts/zeroshot60.sh
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
MODELS = {"dense": "results/zeroshot_dense_smollm2", "Wanda": "results/zeroshot60_smollm2/wanda",
          "SparseGPT": "results/zeroshot60_smollm2/sparsegpt",
          "SparseFW + rec": "results/zeroshot60_smollm2/sparsefw_rec"}
N_DOCS = 500


def scores(folder: Path, task: str, metric: str, n: int = N_DOCS) -> list[float] | None:
    """The per-document 0/1 scores of documents 0..n−1 (or all, if the task has fewer), from the
    shards in ``folder/task``; None if the metric is absent. Raises FileNotFoundError if a shard is
    missing."""
    got: dict[int, float] = {}
    for f in sorted((folder / task).glob("*.json")):
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


def build(models: dict[str, Path], base: str, others: list[str]) -> tuple[str, dict]:
    out: dict = {"n_docs_per_task": {}, "acc": {}, "paired": {}}
    lines = ["| model | " + " | ".join(TASKS) + " | mean of 7 |", "|---" * (len(TASKS) + 2) + "|"]
    for name, folder in models.items():
        row, accs, ses = [], [], []
        for t in TASKS:
            x = scores(folder, t, "acc")
            out["n_docs_per_task"][t] = len(x)
            m, se = mean_se(x)
            accs.append(m)
            ses.append(se)
            row.append(f"{100 * m:.1f} ± {100 * se:.1f}")
        mean, se = statistics.fmean(accs), math.sqrt(sum(s * s for s in ses)) / len(ses)
        out["acc"][name] = {"tasks": dict(zip(TASKS, accs)), "se": dict(zip(TASKS, ses)), "mean": mean, "mean_se": se}
        lines.append(f"| {name} | " + " | ".join(row) + f" | **{100 * mean:.2f} ± {100 * se:.2f}** |")
    lines += ["", f"Paired per-document differences, {base} minus each other model (percentage points, ± SE; z):", "",
              "| metric | vs | " + " | ".join(TASKS) + " | mean of 7 | pooled documents |",
              "|---" * (len(TASKS) + 4) + "|"]
    for metric in ("acc", "acc_norm"):
        for other in others:
            row, ds, ses, pooled = [], [], [], []
            for t in TASKS:
                a, b = scores(models[base], t, metric), scores(models[other], t, metric)
                if a is None or b is None:   # no acc_norm: the task's acc
                    a, b = scores(models[base], t, "acc"), scores(models[other], t, "acc")
                diff = [x - y for x, y in zip(a, b)]
                pooled += diff
                d, se = mean_se(diff)
                ds.append(d)
                ses.append(se)
                row.append(f"{100 * d:+.1f} ± {100 * se:.1f}")
            d, se = statistics.fmean(ds), math.sqrt(sum(s * s for s in ses)) / len(ses)
            pd, pse = mean_se(pooled)
            out["paired"][f"{metric}: {base} - {other}"] = {
                "tasks": dict(zip(TASKS, ds)), "se": dict(zip(TASKS, ses)), "mean": d, "mean_se": se,
                "z": d / se if se else None, "pooled": pd, "pooled_se": pse, "pooled_n": len(pooled),
                "pooled_z": pd / pse if pse else None}
            lines.append(f"| {metric} | {other} | " + " | ".join(row)
                         + f" | **{100 * d:+.2f} ± {100 * se:.2f}** (z = {d / se:+.1f}) "
                         f"| {100 * pd:+.2f} ± {100 * pse:.2f} (z = {pd / pse:+.1f}, n = {len(pooled)}) |")
    return "\n".join(lines) + "\n", out


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "results/zeroshot60_smollm2"
    models = {k: root / v for k, v in MODELS.items()}
    md, out = build(models, "SparseFW + rec", ["Wanda", "SparseGPT", "dense"])
    (out_dir / "zeroshot60.md").write_text(md)
    (out_dir / "zeroshot60.json").write_text(json.dumps(out, indent=1))
    print(md)


if __name__ == "__main__":
    main()
