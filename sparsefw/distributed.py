"""Several processes (``torchrun``, ``accelerate launch``): ranks, layer assignment and reductions
(plumbing around torch.distributed, through accelerate's ``PartialState``).

Scheme (llm-compressor's GPTQ distribution, applied to every method): the calibration windows are
split across ranks in contiguous ranges; every rank runs its windows through the block and
accumulates partial Gram matrices; each layer's partial Grams are summed onto the rank that owns
the layer; owners solve their layers and broadcast the new weights; every rank then propagates its
own windows through the pruned block. Only the main process writes files, logs and progress bars.

So that the masks do not depend on the number of processes, the Gram matrices are summed exactly
(:class:`sparsefw.gram.FixedPointSum`: int64 sums on a grid fixed from a bound over all windows),
and int64 addition is associative: any split of the windows and any reduction order give the
same bits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import SparseFWError
from .models import resolve_device


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank in [0, world), the number of processes, and the
    compute device (``cuda:<local rank>`` under a multi-GPU launch)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_ranks(device: str | torch.device | None = "auto") -> Ranks:
    """Join the run started by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1 in the
    environment) through accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA), or return the
    single-process :class:`Ranks`.

    Raises: SparseFWError for an unknown or unavailable device (as :func:`resolve_device`)."""
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(0, 1, dev)
    from accelerate import PartialState

    state = PartialState(cpu=dev.type == "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", state.local_process_index)
    return Ranks(state.process_index, state.num_processes, dev)


def window_range(n: int, ranks: Ranks, chunk: int = 1) -> range:
    """This rank's windows (or chunks, or other items) out of ``n``: a contiguous range made of
    whole chunks of ``chunk`` consecutive items, the ranks' shares differing by at most one chunk
    (a rank may get none when there are fewer chunks than ranks)."""
    nc = -(-n // chunk)
    return range(min(n, ranks.rank * nc // ranks.world * chunk),
                 min(n, (ranks.rank + 1) * nc // ranks.world * chunk))


def layer_cost(shape) -> float:
    """Estimated solve cost of a (d_out, d_in) layer: one (d_out, d_in) x (d_in, d_in) product per
    FW / CG iteration plus a d_in^3 factorization (SparseGPT, Cholesky), in flops up to a factor."""
    d_out, d_in = shape
    return float(d_out) * d_in * d_in + float(d_in) ** 3


def assign_owners(costs: dict[str, float], world: int) -> dict[str, int]:
    """Owner rank of every item (a group of layers sharing one input): longest-processing-time-
    first greedy on the costs (Graham 1969), ties broken by name and rank so every process
    computes the same assignment.

    Args: costs: name -> cost (e.g. the sum of :func:`layer_cost` over a group). world: processes.
    Returns: name -> rank.
    """
    loads = [0.0] * world
    owner = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(world), key=lambda i: (loads[i], i))
        owner[name] = r
        loads[r] += costs[name]
    return owner


def reduce_sum_(t: torch.Tensor, owner: int, ranks: Ranks) -> None:
    """Sum the ranks' int64 partial sums ``t`` onto ``owner`` in place (``torch.distributed.reduce``;
    integer sums are exact, so the reduction order does not matter). ``t`` on other ranks is
    left undefined. A collective: every rank calls it for the same tensors in the same order."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    dist.reduce(t, dst=owner, op=dist.ReduceOp.SUM)


def broadcast_tensor_(t: torch.Tensor, src: int, ranks: Ranks) -> None:
    """Broadcast ``t`` in place from ``src`` bit for bit (16-bit floats travel as int16, which
    every backend supports)."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    buf = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    dist.broadcast(buf, src=src)


def broadcast_object(obj, src: int, ranks: Ranks):
    """``obj`` from rank ``src`` on every rank (pickled)."""
    if ranks.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_any(error: Exception | None, ranks: Ranks) -> None:
    """A collective error check: if any rank hit a SparseFWError, every rank raises one with the
    first failing rank's message (so no rank waits forever in a later collective)."""
    if ranks.world == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    msgs = [None] * ranks.world
    dist.all_gather_object(msgs, None if error is None else str(error))
    first = next((m for m in msgs if m), None)
    if first is not None:
        raise SparseFWError(first)


def all_sum(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sum of a list of floats over ranks (float64)."""
    if ranks.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64,
                     device=ranks.device if ranks.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_max(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise maximum of a list of floats over ranks (exact, order-independent)."""
    if ranks.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64,
                     device=ranks.device if ranks.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (``torch.distributed.barrier``); a no-op with one process."""
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()
