"""Crash-safe progress of a long prune (plumbing): ``prune --resume``.

While a run with ``--output OUT`` prunes, the folder ``OUT.partial`` beside the output holds what a
restart needs: the pruned parameters of every finished decoder block (``block-00003.safetensors``,
written atomically after the block's outputs were computed) and ``state.json`` (the settings
fingerprint, the finished blocks and their layer reports). A run killed after block k (power loss,
OOM kill, Ctrl-C) leaves it; ``--resume`` loads blocks 0..k from it, recomputes their outputs on the
calibration windows (a forward pass, the same computation as the uninterrupted run, so the inputs
of block k+1 are the same bit for bit) and prunes from block k+1 on. The checkpoint itself is only
ever written at the end, atomically (:func:`sparsefw.saving.staged_output`), after which the
partial folder is deleted: a half-finished run is never mistaken for a result.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import SparseFWError
from .paths import write_atomic
from .report import LayerReport

_FORMAT = 1


def partial_dir(output: str | os.PathLike) -> Path:
    """The progress folder of a run writing ``output``: ``<output>.partial`` beside it."""
    out = Path(output).expanduser().resolve()
    return out.with_name(out.name + ".partial")


class RunState:
    """The progress of one prune in :func:`partial_dir` (see the module docstring).

    Args: output: the run's output folder. fingerprint: everything that defines the masks (model,
        settings, calibration, process count) as a JSON-able dict; a resumed run must match it.
        resume: continue from an existing progress folder (else one is an error, unless
        ``overwrite``). overwrite: delete an existing progress folder and start over.
        write: this process writes the folder (the main process; the others only read it).
    Raises: SparseFWError: a progress folder exists without ``resume`` / ``overwrite``; ``resume``
        with settings that differ from the interrupted run's.
    """

    def __init__(self, output, fingerprint: dict, resume: bool = False, overwrite: bool = False,
                 write: bool = True):
        self.dir, self.write = partial_dir(output), write
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.blocks: dict[int, list] = {}
        state = self.dir / "state.json"
        if self.dir.exists() and not resume:
            if not overwrite:
                raise SparseFWError(f"an interrupted run left '{self.dir}': pass --resume to continue it, or "
                                    "--overwrite to start over")
            if write:
                shutil.rmtree(self.dir)
        elif resume and state.exists():
            saved = json.loads(state.read_text())
            if saved.get("fingerprint") != self.fingerprint:
                diff = sorted(k for k in set(saved.get("fingerprint", {})) | set(self.fingerprint)
                              if saved.get("fingerprint", {}).get(k) != self.fingerprint.get(k))
                raise SparseFWError(f"--resume: the run in '{self.dir}' had other settings ({', '.join(diff)}); "
                                    "give the same options, or --overwrite to start over")
            self.blocks = {int(k): v for k, v in saved["blocks"].items()}

    def finished(self, index: int) -> dict[str, torch.Tensor] | None:
        """The saved parameters (name within the block -> tensor) of block ``index`` if it was
        finished before, else None."""
        if index not in self.blocks:
            return None
        from .inspection import open_safetensors

        with open_safetensors(self.dir / f"block-{index:05d}.safetensors") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}

    def reports(self, index: int) -> list[LayerReport]:
        """The layer reports of finished block ``index``."""
        return [LayerReport(**r) for r in self.blocks[index]]

    def save(self, index: int, block: torch.nn.Module, reports: list[LayerReport]) -> None:
        """Record block ``index`` as finished: its parameters, then state.json (both atomic)."""
        from dataclasses import asdict

        from safetensors.torch import save_file

        self.blocks[index] = [asdict(r) for r in reports]
        if not self.write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.dir / f"block-{index:05d}.safetensors"
        tmp = f.with_name(f.name + ".tmp")
        save_file({n: p.detach().to("cpu").contiguous() for n, p in block.state_dict().items()}, str(tmp))
        os.replace(tmp, f)
        write_atomic(self.dir / "state.json", json.dumps(
            {"format": _FORMAT, "fingerprint": self.fingerprint, "blocks": self.blocks}, default=str))

    def remove(self) -> None:
        """Delete the progress folder (the run finished and its output is written)."""
        if self.write:
            shutil.rmtree(self.dir, ignore_errors=True)


def run_state(model: str, cfg, output, ranks, resume: bool, overwrite: bool) -> RunState | None:
    """The :class:`RunState` of a run writing ``output`` (None without output); its fingerprint is
    the model, every setting of ``cfg`` (:class:`sparsefw.config.PruneConfig`), the process count
    (``ranks``: :class:`sparsefw.distributed.Ranks`) and the device type.
    Raises SparseFWError as RunState does (a partial run without --resume, other settings)."""
    if output is None:
        if resume:
            raise SparseFWError("--resume continues a run that writes --output; give the same --output")
        return None
    fp = {"model": model, **cfg.report_fields(), "processes": ranks.world, "device": ranks.device.type}
    return RunState(output, fp, resume=resume, overwrite=overwrite, write=ranks.is_main)
