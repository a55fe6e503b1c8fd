"""The report of a pruning run (plumbing): the per-layer records, the run summary, and the
``report.json`` dict that the in-memory run (:func:`sparsefw.api.prune`) and the streaming run
(:func:`sparsefw.streaming.stream_prune`) both build with :func:`run_report`."""
from __future__ import annotations

import math
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class LayerReport:
    """Per-layer outcome. Errors are relative: ||(W - W_hat) X||^2 / ||W X||^2 on this layer's
    calibration inputs (the inputs produced by the already-pruned earlier blocks). ``extra``:
    numbers a method reports beyond these fields."""

    name: str
    shape: list
    error_warmstart: float
    error_final: float
    error_wanda: float
    iterations: int = 0
    fw_gap: float = 0.0
    chosen: str = ""
    error_before_reconstruct: float | None = None
    seconds: float = 0.0
    at_cap: int = 0
    swaps: int = 0
    error_before_swaps: float | None = None
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_info(cls, name: str, shape: list, info: dict) -> "LayerReport":
        """A report from :func:`sparsefw.methods.solve_layer`'s info (unknown keys go to ``extra``)."""
        known = {f.name for f in fields(cls)}
        return cls(name=name, shape=shape, **{k: v for k, v in info.items() if k in known},
                   extra={k: v for k, v in info.items() if k not in known})


def _iteration_summary(its: list) -> dict:
    """Mean, p50, p90 and max of the layers' FW iterations (the longest row of each layer)."""
    if not its:
        return {"mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    s = sorted(its)
    return {"mean": sum(s) / len(s), "p50": s[len(s) // 2], "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
            "max": s[-1]}


def _timings(timer: dict, reports: list, total: float) -> dict:
    """Seconds per part of a prune: calibration forward, Gram accumulation (this process), the
    layers' warmstart / FW iterations / rounding / swaps / reconstruction / solve (the method's
    own work) / reporting (errors for the report), and the rest (reductions, placement)."""
    out = dict(timer)
    for r in reports:
        for k, v in r.timings.items():
            out[k] = out.get(k, 0.0) + v
    out["other"] = max(total - sum(out.values()), 0.0)
    return out


def prune_summary(reports: list[LayerReport], timer: dict, t0: float) -> dict:
    """The summary of :func:`sparsefw.pipeline.prune_model`: ``layers`` (dicts), ``seconds`` since
    ``t0`` (``time.perf_counter``), mean relative errors (final, Wanda's mask, warmstart),
    ``error_reduction_vs_wanda`` = 1 - mean(final)/mean(wanda), the geometric mean of the
    per-layer ratios, FW iteration and swap counts, and ``timings`` (seconds per part). MoE:
    ``expert_layers`` (expert slices pruned), ``experts_fallback`` (of them, magnitude-pruned for
    lack of routed calibration tokens) and ``experts_without_tokens`` (none at all: left out of
    the error means)."""
    all_reports = reports
    reports = [r for r in reports if r.extra.get("tokens", 1) != 0]   # experts no token reached: no error
    n = max(len(reports), 1)
    mf = sum(r.error_final for r in reports) / n
    mw = sum(r.error_wanda for r in reports) / n
    ms = sum(r.error_warmstart for r in reports) / n
    geo = math.exp(sum(math.log(max(r.error_final, 1e-30) / max(r.error_wanda, 1e-30)) for r in reports) / n)
    experts = [r for r in all_reports if "tokens" in r.extra]
    return {"layers": [asdict(r) for r in all_reports],
            "expert_layers": len(experts), "experts_fallback": sum(1 for r in experts if r.extra.get("fallback")),
            "experts_without_tokens": sum(1 for r in experts if r.extra["tokens"] == 0),
            "seconds": time.perf_counter() - t0, "mean_error_final": mf,
            "mean_error_wanda": mw, "mean_error_warmstart": ms,
            "error_reduction_vs_wanda": 1.0 - mf / mw if mw > 0 else 0.0,
            "geomean_ratio_vs_wanda": geo,
            "layers_fw_kept": sum(1 for r in reports if r.chosen == "fw"),
            "fw_iterations": _iteration_summary([r.iterations for r in reports]),
            "layers_at_iteration_cap": sum(1 for r in reports if r.at_cap > 0),
            "swaps_applied": sum(r.swaps for r in reports),   # "swaps" is the setting (rounds)
            "timings": _timings(timer, reports, time.perf_counter() - t0)}


def run_report(model: str, cfg, device, dtype, res: dict, t0: float, **extra) -> dict:
    """The ``report.json`` dict of a run: the model, every setting that defines the masks
    (:meth:`sparsefw.config.PruneConfig.report_fields`), the device and dtype, ``extra`` entries
    (e.g. ``stream``, ``bos_token``, perplexities), the summary of
    :func:`sparsefw.pipeline.prune_model` (``res``, consumed), ``total_seconds`` since ``t0``, the
    code version (:func:`code_version`) and, last, the per-layer list."""
    report = {"model": model, **cfg.report_fields(), "device": str(device),
              "dtype": str(dtype).replace("torch.", ""), "code": code_version(), **extra}
    report["seconds"] = res.pop("seconds")
    report.update(res)
    report["total_seconds"] = time.perf_counter() - t0
    return layers_last(report)


def layers_last(report: dict) -> dict:
    """Move the per-layer list (``"layers"``) to the end of ``report`` (in place; the summary
    reads first in report.json). Returns ``report``."""
    if "layers" in report:
        report["layers"] = report.pop("layers")
    return report


def code_version(root: str | Path | None = None) -> str:
    """The commit that last changed the package code (``sparsefw/``), ``+dirty`` with uncommitted
    changes there, or ``unknown`` outside a git checkout; recorded in every result cell. A commit
    that changes only docs, scripts or results keeps the version, so the cells made before it are
    still current (``scripts/check_results_current.py`` checks that). ``root``: the checkout to
    describe (default: the one this package was imported from)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "sparsefw"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sparsefw"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + ("+dirty" if dirty else "")
