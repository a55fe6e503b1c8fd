"""Streaming prunes at real Llama-3 shapes on this host: does a full 8B prune complete, how long
does a block take per method, how much memory does the process need, and what does that give
for a full 8B / 70B prune.

Every prune is ``python -m sparsefw prune --model CKPT --stream --sparsity 0.5 --nsamples 8
--seqlen 128 --device cpu --output OUT`` (calibration: the default ``wiki`` text, which is offline)
on a random-weight bf16 checkpoint from ``scripts/make_shaped_checkpoint.py`` (made once in
``--workdir``, reused when the folder already holds that shape), run as a fresh child process with
``OMP_NUM_THREADS`` = ``--threads`` (default: the cores of this host) and ``HF_HUB_OFFLINE=1``.

* wall seconds: the child's, from start to exit (imports, load and save included);
* peak RSS: ``ru_maxrss`` of that child alone, from ``os.wait4`` on its pid (the kernel's
  high-water mark of its resident memory, GiB), not of this script;
* from the run's ``report.json``: ``seconds`` (the pruning itself, from capturing the first block's
  inputs to the last block) / blocks = seconds per block; the layers' ``seconds`` (a layer's solve,
  with the error it reports), their mean and their sum per block; and ``timings``. report.json holds
  no wall time per block.

Parts:

(a) ``--part a``: the full 32-block Llama-3-8B checkpoint (16 GB; ``--checkpoint DIR`` to use or
    make it elsewhere) pruned with Wanda. Records completed yes/no, wall seconds, peak RSS, the
    per-block solve seconds, and ``sparsefw inspect OUT --json``: the number of pruned Linear layers
    and their min / max sparsity (acceptance: 7 x 32 = 224 layers, all at 50%). OUT is deleted
    afterwards unless ``--keep``.
(b) ``--part b``: Llama-3-8B (2 blocks) and Llama-3-70B (1 block) x magnitude, wanda, sparsegpt,
    sparsefw, sparsefw + --reconstruct (``--shapes``, ``--methods`` select; ``--extra-args`` is passed
    to every prune and becomes part of the cell's name; a method option such as ``--solver-memory``
    makes the prune of a method without it fail with exit 2, so select the methods that have it).
(c) always, in the Markdown: hours for the full model (32 blocks for 8B, 80 for 70B) per method on
    this host = seconds per block x blocks / 3600, which leaves out loading, saving and the LM head;
    and a GPU column: "not measured" unless ``--gpu-json`` (default results/gpu_check.json, written by
    ``bash scripts/gpu_check.sh --json FILE``) exists. If that file has a GEMM rate
    (``gemm_flops_per_s``), this host's hours are scaled by (this host's 2048 x 2048 float32 GEMM rate,
    measured once and stored in the JSON) / (that rate). gpu_check.py as it is reports no such rate but
    seconds per block of its 2-block Llama-3-8B model (8 x 2048 calibration tokens); then the 8B
    column is its solve seconds + its forward seconds rescaled to this benchmark's calibration tokens,
    x 32 blocks, and the 70B column that times this host's 70B / 8B per-block ratio (an estimate).

Results: ``--out`` (results/bench_scale.json), resumable: a cell already there is skipped unless
``--force`` (``--retry-failed`` re-runs only failed cells); a failed cell (non-zero exit, e.g. killed
for memory, or ``--timeout-s``) is recorded with its return code and the tail of its output.
results/bench_scale.md is rendered from the JSON after every cell. Each child's full output is in
WORKDIR/logs/.

    .venv/bin/python scripts/bench_scale.py --part a                     # hours on 2 cores; 32 GB of disk
    .venv/bin/python scripts/bench_scale.py --part b [--methods wanda,sparsefw] [--shapes llama3-8b]
    .venv/bin/python scripts/bench_scale.py --part b --methods sparsefw --extra-args="--solver-memory 2"
    .venv/bin/python scripts/bench_scale.py --render                      # the Markdown from the JSON only

Tiny shapes for tests: ``--shape-set hidden_size=64 --shape-set intermediate_size=128 ...`` (each passed
to make_shaped_checkpoint.py's ``--set``; a results file is tied to one set of overrides).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
PART_B_SHAPES = {"llama3-8b": 2, "llama3-70b": 1}          # shape: blocks of the slice pruned in (b)
FULL_BLOCKS = {"llama3-8b": 32, "llama3-70b": 80}
LINEARS_PER_BLOCK = 7                                      # q, k, v, o, gate, up, down
METHODS = {"magnitude": ["--method", "magnitude"], "wanda": ["--method", "wanda"],
           "sparsegpt": ["--method", "sparsegpt"], "sparsefw": ["--method", "sparsefw"],
           "sparsefw+rec": ["--method", "sparsefw", "--reconstruct"]}
GPU_CHECK_NAMES = {"wanda": "wanda", "sparsegpt": "sparsegpt", "sparsefw": "sparsefw", "sparsefw+rec": "sparsefw+rec"}
TAIL_CHARS = 4000


def parse_sets(items: list[str]) -> dict:
    """``key=value`` strings as make_shaped_checkpoint.py parses its ``--set`` (JSON value, else string)."""
    out = {}
    for kv in items:
        k, _, v = kv.partition("=")
        try:
            out[k] = json.loads(v.lower() if v.lower() in ("true", "false") else v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def checkpoint_dir(workdir: Path, shape: str, blocks: int, sets: dict) -> Path:
    """WORKDIR/<shape>-<blocks>b[-<hash of the overrides>]."""
    tag = "-" + hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:8] if sets else ""
    return workdir / f"{shape}-{blocks}b{tag}"


def ensure_checkpoint(folder: Path, shape: str, blocks: int, sets: list[str], log: Path) -> None:
    """Make the checkpoint with make_shaped_checkpoint.py unless ``folder`` already holds it."""
    meta = folder / "SHAPE.json"
    want = {"shape": shape, "blocks": blocks, "overrides": parse_sets(sets)}
    if meta.exists():
        have = json.loads(meta.read_text())
        if {k: have.get(k) for k in want} == want:
            print(f"checkpoint {folder}: present", flush=True)
            return
        sys.exit(f"error: '{folder}' holds {have.get('shape')} x {have.get('blocks')} blocks "
                 f"(overrides {have.get('overrides')}), not {shape} x {blocks} ({want['overrides']}); move it away")
    if folder.exists():
        sys.exit(f"error: '{folder}' exists and is not a make_shaped_checkpoint.py checkpoint; move it away")
    cmd = [sys.executable, str(ROOT / "scripts" / "make_shaped_checkpoint.py"), "--shape", shape,
           "--out", str(folder), "--blocks", str(blocks)] + [x for kv in sets for x in ("--set", kv)]
    print(f"making checkpoint {folder} ({shape}, {blocks} blocks) ...", flush=True)
    t = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        sys.exit(f"error: make_shaped_checkpoint.py failed (exit {r.returncode}):\n{tail(log)}")
    print(f"checkpoint {folder}: made in {time.perf_counter() - t:.0f} s", flush=True)


def tail(log: Path, n: int = TAIL_CHARS) -> str:
    """The last ``n`` characters of a log (tqdm's carriage returns as new lines)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:].replace("\r", "\n")


def child_env(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return env


def run_measured(cmd: list[str], env: dict, log: Path, timeout_s: float = 0, heartbeat_s: float = 300) -> dict:
    """Run ``cmd`` as a child (its own session, output to ``log``); wait for it with ``os.wait4``.

    Returns {"rc", "wall_s", "peak_rss_gib" (ru_maxrss of this child), "timed_out"}. A child past
    ``timeout_s`` (0 = none) gets SIGKILL on its process group, rc -9."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    timed_out, beat = False, t0
    try:
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            if timeout_s and now - t0 > timeout_s and not timed_out:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
            if heartbeat_s and now - beat > heartbeat_s:
                beat = now
                last = tail(log, 400).strip().splitlines()
                print(f"  ... {now - t0:.0f} s: {last[-1] if last else ''}", flush=True)
            time.sleep(0.05 if now - t0 < 5 else 0.5)
    except BaseException:                         # Ctrl-C: take the child down too, record nothing
        try:
            os.killpg(p.pid, signal.SIGKILL)
            os.waitpid(p.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    p.returncode = os.waitstatus_to_exitcode(status)   # reaped here; keep Popen from waiting again
    return {"rc": p.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_gib": ru.ru_maxrss * 1024 / GiB,
            "timed_out": timed_out}


def prune_cmd(ckpt: Path, method: str, out: Path, a) -> list[str]:
    return ([sys.executable, "-m", "sparsefw", "prune", "--model", str(ckpt), "--stream", *METHODS[method],
             "--sparsity", str(a.sparsity), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
             "--device", "cpu", "--output", str(out)] + shlex.split(a.extra_args))


def block_solve_seconds(report: dict, blocks: int) -> list[float]:
    """Per block: the sum of its layers' solve seconds (``layers[i].seconds``; the block index is the
    ``.N.`` in the layer name). report.json keeps no per-block wall time."""
    out = [0.0] * blocks
    for layer in report.get("layers", []):
        parts = layer["name"].split(".")
        idx = next((int(p) for p in parts if p.isdigit()), None)
        if idx is not None and idx < blocks:
            out[idx] += float(layer.get("seconds", 0.0))
    return out


def code_version() -> str:
    """The commit that last changed this checkout's package code, which the prunes run (``-m sparsefw``
    from it; :func:`sparsefw.report.code_version`)."""
    from sparsefw.report import code_version as version

    return version(ROOT)


def measure_prune(ckpt: Path, method: str, blocks: int, key: str, a, env: dict) -> tuple[dict, Path]:
    """One streaming prune of ``ckpt`` in a fresh child: the cell (see the module docstring) and its
    output folder (which the caller deletes)."""
    slug = key.replace("/", "_").replace(" ", "_").replace("=", "-")
    run_dir = a.workdir / "runs" / slug
    shutil.rmtree(run_dir, ignore_errors=True)
    out, log = run_dir / "out", a.workdir / "logs" / f"{slug}.log"
    cmd = prune_cmd(ckpt, method, out, a)
    code = code_version()                   # before the run: the code the child imports
    print(f"[{key}] {shlex.join(cmd[1:])}", flush=True)
    r = run_measured(cmd, env, log, a.timeout_s, a.heartbeat_s)
    cell = {"method": method, "blocks": blocks, "extra_args": a.extra_args, "cmd": shlex.join(cmd), "log": str(log),
            **r, "threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code}
    rep_path = out / "report.json"
    cell["completed"] = r["rc"] == 0 and rep_path.exists()
    if cell["completed"]:
        rep = json.loads(rep_path.read_text())
        layers = rep.get("layers", [])
        cell.update(prune_s=rep["seconds"], s_per_block=rep["seconds"] / blocks, total_s=rep.get("total_seconds"),
                    timings=rep.get("timings", {}), block_solve_s=block_solve_seconds(rep, blocks),
                    solve_s_per_layer=sum(x.get("seconds", 0.0) for x in layers) / max(len(layers), 1),
                    layers=len(layers), achieved_sparsity=rep.get("achieved_sparsity"),
                    mean_error_final=rep.get("mean_error_final"))
        if isinstance(rep.get("block_seconds"), list):      # if a later report.json has per-block wall time
            cell["block_s"] = rep["block_seconds"]
    else:
        cell["tail"] = tail(log)
    status = "done" if cell["completed"] else f"FAILED (rc {r['rc']}{', timed out' if r['timed_out'] else ''})"
    print(f"[{key}] {status}: wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB"
          + (f", {cell['s_per_block']:.2f} s/block" if cell["completed"] else ""), flush=True)
    return cell, run_dir


def inspect_output(out: Path, env: dict, expected_layers: int) -> dict:
    """``sparsefw inspect OUT --json``: pruned Linear layers, their min / max sparsity, the acceptance."""
    r = subprocess.run([sys.executable, "-m", "sparsefw", "inspect", str(out), "--json"], capture_output=True,
                       text=True, env=env, check=False)
    if r.returncode != 0:
        return {"ok": False, "rc": r.returncode, "tail": (r.stdout + r.stderr)[-TAIL_CHARS:]}
    info = json.loads(r.stdout)
    sp = [x["sparsity"] for x in info["layers"]]
    res = {"linear_layers": info["pruned_layers"], "min_sparsity": min(sp, default=None),
           "max_sparsity": max(sp, default=None), "sparsity": info["sparsity"], "dtypes": info["dtypes"],
           "bytes": info["bytes"], "expected_layers": expected_layers}
    res["ok"] = bool(sp) and info["pruned_layers"] == expected_layers and all(abs(s - 0.5) < 1e-3 for s in sp)
    return res


def host_gemm(threads: int, n: int = 2048, reps: int = 5) -> dict:
    """This host's float32 GEMM rate: the best of ``reps`` n x n @ n x n matmuls (2 n^3 FLOPs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    x @ y
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(before)
    return {"gemm_n": n, "gemm_dtype": "float32", "gemm_threads": threads, "gemm_s": best,
            "gemm_flops_per_s": 2 * n ** 3 / best, "torch": torch.__version__}


def load_results(path: Path, settings: dict) -> dict:
    if not path.exists():
        return {"settings": settings, "host": {}, "cells": {}}
    res = json.loads(path.read_text())
    if res.get("settings") != settings:
        sys.exit(f"error: {path} holds results for other settings ({res.get('settings')}, now {settings}); "
                 "use another --out")
    return res


def save_results(res: dict, path: Path, gpu_json: Path) -> None:
    """The JSON and the Markdown beside it (written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p, text in ((path, json.dumps(res, indent=2)), (path.with_suffix(".md"), render(res, gpu_json))):
        tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(p)


def wanted(res: dict, key: str, a) -> bool:
    """Whether the cell ``key`` runs now (absent, --force, or failed with --retry-failed)."""
    cell = res["cells"].get(key)
    if cell is None or a.force or (a.retry_failed and not cell.get("completed")):
        return True
    print(f"[{key}] present ({'done' if cell.get('completed') else 'failed'}); skipped (--force to re-run)",
          flush=True)
    return False


def cell_key(part: str, shape: str, method: str, extra: str) -> str:
    return f"{part}/{shape}/{method}" + (f" {extra}" if extra else "")


def run_part_a(a, res: dict, env: dict) -> None:
    shape, blocks, method = "llama3-8b", FULL_BLOCKS["llama3-8b"], "wanda"
    key = cell_key("a", shape, method, a.extra_args)
    if not wanted(res, key, a):
        return
    ckpt = Path(a.checkpoint) if a.checkpoint else checkpoint_dir(a.workdir, shape, blocks, parse_sets(a.shape_set))
    ensure_checkpoint(ckpt, shape, blocks, a.shape_set, a.workdir / "logs" / f"make_{ckpt.name}.log")
    cell, run_dir = measure_prune(ckpt, method, blocks, key, a, env)
    cell["checkpoint"] = str(ckpt)
    if cell["completed"]:
        cell["inspect"] = inspect_output(run_dir / "out", env, LINEARS_PER_BLOCK * blocks)
        i = cell["inspect"]
        print(f"[{key}] inspect: {i.get('linear_layers')} pruned Linear layers, sparsity "
              f"{i.get('min_sparsity')} .. {i.get('max_sparsity')}; acceptance {'met' if i['ok'] else 'NOT met'}",
              flush=True)
    if a.keep:
        print(f"[{key}] kept {run_dir / 'out'}", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    res["cells"][key] = cell
    save_results(res, a.out, a.gpu_json)


def run_part_b(a, res: dict, env: dict) -> None:
    for shape in a.shapes.split(","):
        blocks = PART_B_SHAPES[shape]
        keys = {m: cell_key("b", shape, m, a.extra_args) for m in a.methods.split(",")}
        todo = [m for m, k in keys.items() if wanted(res, k, a)]
        if not todo:
            continue
        ckpt = checkpoint_dir(a.workdir, shape, blocks, parse_sets(a.shape_set))
        ensure_checkpoint(ckpt, shape, blocks, a.shape_set, a.workdir / "logs" / f"make_{ckpt.name}.log")
        for m in todo:
            cell, run_dir = measure_prune(ckpt, m, blocks, keys[m], a, env)
            cell["checkpoint"] = str(ckpt)
            if not a.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
            res["cells"][keys[m]] = cell
            save_results(res, a.out, a.gpu_json)


def gpu_hours(gpu: dict | None, res: dict, shape: str, method: str, extra: str) -> str:
    """The GPU column of the extrapolation table (see the module docstring)."""
    if gpu is None:
        return "not measured"
    if str(gpu.get("info", {}).get("device", "cuda")).startswith("cpu"):
        return "not measured (gpu_check ran on the CPU)"
    cells = res["cells"]
    host = cells.get(cell_key("b", shape, method, extra), {})
    rate = gpu.get("gemm_flops_per_s") or gpu.get("info", {}).get("gemm_flops_per_s")
    host_rate = res.get("host", {}).get("gemm_flops_per_s")
    if rate and host_rate and host.get("completed"):
        return f"{host['s_per_block'] * FULL_BLOCKS[shape] / 3600 * host_rate / rate:.3g} (GEMM-rate scaled)"
    run = gpu.get("runs", {}).get(f"llama3-8b/{GPU_CHECK_NAMES.get(method, '')}/50%")
    if run is None:
        return "not measured (not in gpu_check)"
    tokens = res["settings"]["nsamples"] * res["settings"]["seqlen"]
    s8 = run["solve_s_per_block"] + run["forward_s_per_block"] * tokens / (run["nsamples"] * run["seqlen"])
    if shape == "llama3-8b":
        return f"{s8 * FULL_BLOCKS[shape] / 3600:.3g} (gpu_check 8B, rescaled)"
    h8 = cells.get(cell_key("b", "llama3-8b", method, extra), {})
    if not (host.get("completed") and h8.get("completed")):
        return "not measured (needs this host's 8B and 70B cells)"
    ratio = host["s_per_block"] / h8["s_per_block"]
    return f"{s8 * ratio * FULL_BLOCKS[shape] / 3600:.3g} (gpu_check 8B x host 70B/8B ratio {ratio:.1f})"


def fmt(x, spec: str = ".1f") -> str:
    return "" if x is None else format(x, spec)


def render_a(res: dict) -> list[str]:
    lines = ["## (a) Full 32-block Llama-3-8B, Wanda, streaming", ""]
    cells = {k: c for k, c in res["cells"].items() if k.startswith("a/")}
    if not cells:
        return lines + ["not run (`--part a`)", ""]
    lines += [("| cell | completed | wall s | peak RSS GiB | pruning s | s/block | solve s/block min / mean / max | "
               "pruned Linears | sparsity min / max | acceptance (224 at 50%) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for k, c in cells.items():
        bs, i = c.get("block_solve_s") or [], c.get("inspect") or {}
        solve = f"{min(bs):.2f} / {sum(bs) / len(bs):.2f} / {max(bs):.2f}" if bs else ""
        ok = "" if not i else ("met" if i.get("ok") else "NOT met")
        lines.append(f"| {k} | {'yes' if c['completed'] else 'no (rc ' + str(c['rc']) + ')'} | {c['wall_s']:.0f} | "
                     f"{c['peak_rss_gib']:.2f} | {fmt(c.get('prune_s'), '.0f')} | {fmt(c.get('s_per_block'), '.2f')} | "
                     f"{solve} | {i.get('linear_layers', '')} | {fmt(i.get('min_sparsity'), '.4f')} / "
                     f"{fmt(i.get('max_sparsity'), '.4f')} | {ok} |")
    return lines + [""]


def render_b(res: dict) -> list[str]:
    lines = ["## (b) Seconds per block and peak memory, per method", ""]
    cells = {k: c for k, c in res["cells"].items() if k.startswith("b/")}
    if not cells:
        return lines + ["not run (`--part b`)", ""]
    lines += ["| shape | blocks | method | threads | completed | wall s | pruning s | s/block | forwards + Gram / "
              "reporting / solve, s/block | solve s/layer | peak RSS GiB | code |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, c in cells.items():
        _, shape, label = k.split("/", 2)
        t, n = c.get("timings") or {}, max(c.get("blocks") or 1, 1)
        fg = t.get("calibration_forward", 0.0) + t.get("gram", 0.0)
        rest = sum(v for key, v in t.items() if key not in ("calibration_forward", "gram", "reporting", "other"))
        parts = f"{fg / n:.0f} / {t.get('reporting', 0.0) / n:.0f} / {rest / n:.0f}" if t else ""
        lines.append(f"| {shape} | {c['blocks']} | {label} | {c.get('threads', '?')} | "
                     f"{'yes' if c['completed'] else 'no (rc ' + str(c['rc']) + ')'} "
                     f"| {c['wall_s']:.1f} | {fmt(c.get('prune_s'))} | {fmt(c.get('s_per_block'), '.2f')} | {parts} | "
                     f"{fmt(c.get('solve_s_per_layer'), '.3f')} | {c['peak_rss_gib']:.2f} | {c.get('code', '?')} |")
    return lines + [""]


def render_c(res: dict, gpu: dict | None, gpu_json: Path) -> list[str]:
    s, host = res["settings"], res.get("host", {})
    note = (f"Hours = seconds per block (from (b): report.json's pruning seconds / blocks, at {s['nsamples']} x "
            f"{s['seqlen']} calibration tokens) x blocks of the full model (32 for 8B, 80 for 70B) / 3600. This "
            "leaves out loading, saving and the LM head (and the embeddings' read), and a larger calibration "
            "(e.g. 128 x 2048) makes the forward and Gram parts longer. GPU column: "
            + (f"from {gpu_json}." if gpu else f"not measured ({gpu_json} does not exist)."))
    if host.get("gemm_flops_per_s"):
        note += (f" This host: {host.get('cores')} cores, {host['gemm_n']}x{host['gemm_n']} float32 GEMM "
                 f"{host['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s with {host.get('gemm_threads')} threads.")
    lines = ["## (c) Extrapolated hours for the full model", "", note, "",
             "| shape | method | s/block (this host) | blocks | hours, this host | hours, GPU |", "|---|---|---|---|---|---|"]
    for k, c in res["cells"].items():
        if not k.startswith("b/") or not c.get("completed"):
            continue
        _, shape, label = k.split("/", 2)
        extra = c.get("extra_args", "")
        n = FULL_BLOCKS[shape]
        lines.append(f"| {shape} | {label} | {c['s_per_block']:.2f} | {n} | {c['s_per_block'] * n / 3600:.3g} | "
                     f"{gpu_hours(gpu, res, shape, c['method'], extra)} |")
    a8 = next((c for k, c in res["cells"].items() if k.startswith("a/") and c.get("completed")), None)
    if a8:
        lines += ["", (f"Measured in (a): the full 8B Wanda prune took {a8['prune_s'] / 3600:.3g} h of pruning "
                       f"({a8['wall_s'] / 3600:.3g} h wall, load and save included).")]
    return lines + [""]


def render(res: dict, gpu_json: Path) -> str:
    gpu = json.loads(Path(gpu_json).read_text()) if gpu_json and Path(gpu_json).exists() else None
    s, host = res["settings"], res.get("host", {})
    head = ["# bench_scale: streaming prunes at Llama-3 shapes", "",
            f"`scripts/bench_scale.py`; sparsity {s['sparsity']}, {s['nsamples']} x {s['seqlen']} calibration "
            f"tokens (wiki), --stream, --device cpu; host {host.get('platform', '?')}"
            + (f"; checkpoint overrides {s['shape_set']}" if s.get("shape_set") else "") + ".", ""]
    return "\n".join(head + render_a(res) + render_b(res) + render_c(res, gpu, gpu_json))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["a", "b"], action="append", default=[], help="run part a and/or b")
    ap.add_argument("--render", action="store_true", help="only write the Markdown from the JSON")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"part b: subset of {','.join(METHODS)}")
    ap.add_argument("--shapes", default=",".join(PART_B_SHAPES), help=f"part b: subset of {','.join(PART_B_SHAPES)}")
    ap.add_argument("--extra-args", default="", help="passed to every prune, e.g. --extra-args='--solver-memory 2' "
                    "(a method option: select the methods that have it, or the others fail with exit 2)")
    ap.add_argument("--workdir", default="/tmp/bench_scale", help="checkpoints, prune outputs, logs")
    ap.add_argument("--checkpoint", default=None, help="part a: the full 8B checkpoint (made there if absent)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_scale.json"))
    ap.add_argument("--gpu-json", default=str(ROOT / "results" / "gpu_check.json"))
    ap.add_argument("--shape-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for make_shaped_checkpoint.py --set (tests)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--timeout-s", type=float, default=0, help="kill a prune after this many seconds (0 = never)")
    ap.add_argument("--heartbeat-s", type=float, default=300, help="print progress every this many seconds")
    ap.add_argument("--force", action="store_true", help="re-run cells already in the JSON")
    ap.add_argument("--retry-failed", action="store_true", help="re-run cells recorded as failed")
    ap.add_argument("--keep", action="store_true", help="keep the pruned outputs (part a: 16 GB)")
    a = ap.parse_args(argv)
    bad = [m for m in a.methods.split(",") if m not in METHODS] + \
          [s for s in a.shapes.split(",") if s not in PART_B_SHAPES]
    if bad:
        ap.error(f"unknown method/shape {bad}")
    if not a.part and not a.render:
        ap.error("give --part a, --part b (or both), or --render")
    a.workdir, a.out = Path(a.workdir), Path(a.out)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    settings = {"sparsity": a.sparsity, "nsamples": a.nsamples, "seqlen": a.seqlen, "shape_set": parse_sets(a.shape_set)}
    if not a.part:                                   # --render only: whatever the JSON holds
        res = json.loads(a.out.read_text()) if a.out.exists() else {"settings": settings, "host": {}, "cells": {}}
    else:
        res = load_results(a.out, settings)
    if a.part and (a.force or not res["host"].get("gemm_flops_per_s")):
        res["host"] = {"cores": os.cpu_count(), "threads": a.threads, "platform": platform.platform(),
                       "processor": platform.processor(), **host_gemm(a.threads)}
        print(f"host GEMM ({res['host']['gemm_n']}^2 float32, {a.threads} threads): "
              f"{res['host']['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    env = child_env(a.threads)
    if "a" in a.part:
        run_part_a(a, res, env)
    if "b" in a.part:
        run_part_b(a, res, env)
    save_results(res, a.out, a.gpu_json)
    print("\n" + render(res, a.gpu_json))
    print(f"wrote {a.out} and {a.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
