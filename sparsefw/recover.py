"""Recovery of a pruned model by mask-preserving distillation from the dense model (``sparsefw recover``).

The student is the pruned checkpoint and the teacher its dense original. Every step minimises

    loss = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))          (Hinton et al. 2015)
         + hidden_weight * mean over blocks of ||h_s - h_t||^2 / ||h_t||^2   (SquareHead: Kurtic et
                                                                              al. 2023, arXiv 2310.06927)

over token windows of the calibration text (never the perplexity text), with AdamW, linear warmup
and cosine decay (transformers' ``get_cosine_schedule_with_warmup``) and gradient accumulation. The
zeros of the pruned layers stay exactly zero: their gradients are masked before every optimizer step
and the mask is applied to the weights after it, so the saved mask equals the input mask bit for bit
(N:M patterns included). The teacher runs in inference mode.

Progress is kept in ``<output>.partial`` every ``checkpoint_every`` steps (student weights, optimizer
and scheduler state, step, losses); ``resume`` continues from it with the same result as an
uninterrupted run (the batches are a fixed function of the step).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import SparseFWError

TRAIN_CHOICES = ("all", "norms,biases", "lora")


@dataclass
class RecoverConfig:
    """Settings of one recovery run (``sparsefw recover`` flags of the same names).

    steps: optimizer steps. lr: peak AdamW learning rate. warmup: warmup steps (linear), then cosine
    decay to 0. batch: windows per micro-batch; grad_accum: micro-batches per step. seqlen: tokens per
    window. nsamples: windows drawn from ``calib`` (cycled in a fixed order). temperature: T of the KL.
    hidden_weight: weight of the SquareHead term (0 = logits only). train: ``all`` kept weights,
    ``norms,biases`` only, or ``lora``: masked low-rank adapters of rank ``lora_rank`` on every pruned
    weight plus the norms and biases, merged into the kept weights at the end (PERP, Zimmer et al.
    2023, arXiv 2312.15230, "MaskLoRA"). weight_decay: AdamW's. checkpoint_every: steps between saved
    progress. seed: windows and order. device: ``cpu`` | ``cuda`` | ``auto``. tokens: budget in
    training tokens (> 0 sets ``steps`` to the steps it takes). minutes: wall-clock budget (> 0: the
    run stops after the first step that ends past it, the schedule still spans ``steps``).
    gradient_checkpointing: recompute the student's activations in the backward pass (less memory,
    ~30% more time)."""

    steps: int = 100
    lr: float = 1e-5
    warmup: int = 10
    batch: int = 4
    grad_accum: int = 1
    seqlen: int = 512
    nsamples: int = 512
    calib: str = "wiki"
    temperature: float = 1.0
    hidden_weight: float = 0.0
    train: str = "all"
    weight_decay: float = 0.0
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    lora_rank: int = 16
    tokens: int = 0
    minutes: float = 0.0
    gradient_checkpointing: bool = False

    @property
    def tokens_per_step(self) -> int:
        return int(self.batch) * int(self.grad_accum) * int(self.seqlen)

    def validate(self) -> None:
        """Raises SparseFWError for a setting out of range, with what to use instead."""
        for k in ("steps", "batch", "grad_accum", "nsamples", "checkpoint_every", "lora_rank"):
            if int(getattr(self, k)) < 1:
                raise SparseFWError(f"{k} must be >= 1, got {getattr(self, k)}")
        if int(self.warmup) < 0 or int(self.seqlen) < 2:
            raise SparseFWError(f"warmup must be >= 0 and seqlen >= 2, got {self.warmup} and {self.seqlen}")
        if not (float(self.lr) > 0 and math.isfinite(float(self.lr))):
            raise SparseFWError(f"lr must be a positive number (e.g. 1e-5), got {self.lr}")
        if not float(self.temperature) > 0 or float(self.hidden_weight) < 0:
            raise SparseFWError("temperature must be > 0 and hidden_weight >= 0")
        if int(self.tokens) < 0 or not float(self.minutes) >= 0:
            raise SparseFWError(f"tokens and minutes must be >= 0 (0 = no budget), got {self.tokens} and {self.minutes}")
        if int(self.tokens) > 0:      # the budget in tokens fixes the number of steps
            self.steps = max(1, math.ceil(int(self.tokens) / self.tokens_per_step))
        if self.train not in TRAIN_CHOICES:
            raise SparseFWError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got '{self.train}'")


# ----------------------------------------------------------------------------------------------
# Losses (pure tensor functions)
# ----------------------------------------------------------------------------------------------
def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) with p = softmax(logits / T), averaged over tokens
    (Hinton et al. 2015, "Distilling the knowledge in a neural network", Eq. 2 and the T^2 scaling).

    Args: student_logits, teacher_logits: (..., vocab) float logits (any float dtype; computed in
        float32). temperature: T > 0.
    Returns: scalar float32 tensor (nats per token), 0 when the two distributions are equal.
    Raises: SparseFWError if the vocabularies (last dimensions) differ."""
    if student_logits.shape != teacher_logits.shape:
        raise SparseFWError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ; the teacher must share the student's vocabulary")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def squarehead_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """SquareHead distillation loss (Kurtic et al. 2023, arXiv 2310.06927, Eq. 1): the mean over
    blocks of ||h_s - h_t||^2 / ||h_t||^2, each block's squared errors summed over its tokens.

    Args: student_hidden, teacher_hidden: sequences of (batch, seqlen, d) hidden states, one per
        block output (``output_hidden_states`` without the embeddings).
    Returns: scalar float32 tensor (dimensionless)."""
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(terms).mean()


def param_masks(model, names: list[str]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, bool mask of its nonzeros, same shape) for every parameter holding a pruned layer
    of ``names`` (:func:`sparsefw.pipeline.check_prunable`'s names): a Linear's or Conv1D's weight,
    or a fused 3-D expert tensor (all its experts' slices). The mask is taken in the parameter's own
    layout, so transposed storage (Conv1D, gpt-oss experts) needs no care."""
    from .capture import full_names
    from .experts import ExpertLinear
    from .models import decoder_blocks, prunable_layers

    want, out = set(names), {}
    full = full_names(model)
    for block in decoder_blocks(model):
        for layer in prunable_layers(block).values():
            if full[id(layer)] not in want:
                continue
            p = getattr(layer.experts, layer.pname) if isinstance(layer, ExpertLinear) else layer.weight
            out.setdefault(id(p), (p, p.detach() != 0))
    return list(out.values())


def apply_masks(masks, grads: bool = False) -> None:
    """Zero the pruned entries of every masked parameter (``grads``: of its gradient) in place.
    masks: :func:`param_masks`."""
    for p, M in masks:
        if grads:
            if p.grad is not None:
                p.grad.mul_(M)
        else:
            p.data.mul_(M)


class MaskedLoRA(torch.nn.Module):
    """Parametrization W -> W + (B A) ⊙ M of one pruned weight: a low-rank adapter whose update
    stays inside the mask, so merging it keeps every pruned entry exactly zero (PERP, Zimmer et al.
    2023, arXiv 2312.15230, "MaskLoRA"; LoRA: Hu et al. 2022, Eq. 3 with alpha / r = 1).

    Args: M: (rows, cols) or (experts, rows, cols) bool mask of the weight, in its stored layout.
        rank: r of the adapter. B starts at zero (the adapter starts as the identity map), A with
        std 1/sqrt(cols) (seeded by ``seed``), both float32 on M's device."""

    def __init__(self, M: torch.Tensor, rank: int, seed: int = 0):
        super().__init__()
        *lead, rows, cols = M.shape
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("M", M, persistent=False)
        self.A = torch.nn.Parameter((torch.randn(*lead, rank, cols, generator=g) / math.sqrt(cols)).to(M.device))
        self.B = torch.nn.Parameter(torch.zeros(*lead, rows, rank, device=M.device))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + torch.where(self.M, torch.matmul(self.B, self.A).to(W.dtype), 0.0)


def add_masked_lora(model, masks, rank: int, seed: int = 0) -> list:
    """Register a :class:`MaskedLoRA` on every masked parameter of ``model`` (``masks``: from
    :func:`param_masks`) with torch's ``parametrize``; the base weights stop training. Returns the
    (module, name) pairs, for :func:`merge_masked_lora`."""
    from torch.nn.utils import parametrize

    want = {id(p): M for p, M in masks}
    owners = [(mod, n) for mod in model.modules() for n, p in mod.named_parameters(recurse=False) if id(p) in want]
    for i, (mod, n) in enumerate(owners):
        M = want[id(getattr(mod, n))]
        getattr(mod, n).requires_grad_(False)
        parametrize.register_parametrization(mod, n, MaskedLoRA(M, rank, seed * 1000003 + i))
    return owners


def merge_masked_lora(owners) -> None:
    """Fold the adapters of :func:`add_masked_lora` into the weights (W + (B A) ⊙ M, pruned entries
    still exactly 0) and remove the parametrizations."""
    from torch.nn.utils import parametrize

    with torch.no_grad():
        for mod, n in owners:
            parametrize.remove_parametrizations(mod, n, leave_parametrized=True)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _check_pair(student, teacher, s_tok, t_tok, masks) -> float:
    """The student's sparsity over its pruned layers; SparseFWError for a teacher with another
    vocabulary or tokenizer, or a student that is not sparse."""
    if student.config.vocab_size != teacher.config.vocab_size or s_tok.get_vocab() != t_tok.get_vocab():
        raise SparseFWError(f"the teacher's vocabulary ({teacher.config.vocab_size} tokens) or tokenizer differs from "
                            f"the student's ({student.config.vocab_size}); distill from the dense model the student "
                            "was pruned from")
    total = sum(M.numel() for _, M in masks)
    sparsity = 1.0 - sum(int(M.sum()) for _, M in masks) / max(total, 1)
    if sparsity < 0.01:
        raise SparseFWError(f"the student is not sparse (sparsity {sparsity:.4f} over its prunable layers); "
                            "give the output of 'sparsefw prune' as --model")
    return sparsity


def _trainable(student, train: str) -> list:
    names = []
    for n, p in student.named_parameters():
        adapter = ".parametrizations." in n and not n.endswith(".original")
        keep = train == "all" or adapter or "norm" in n.lower() or n.endswith(".bias")
        p.requires_grad_(keep and not n.endswith(".original"))
        if p.requires_grad:
            names.append(n)
    if not names:
        raise SparseFWError(f"--train {train} selects no parameter of this model")
    return names


def _batch(windows: torch.Tensor, step: int, micro: int, cfg: RecoverConfig) -> torch.Tensor:
    """The (batch, seqlen) windows of micro-batch ``micro`` of step ``step``: a fixed permutation of
    the windows per pass (seeded by cfg.seed and the pass), so a resumed run sees the same batches."""
    n, per_step = windows.shape[0], cfg.batch * cfg.grad_accum
    start = step * per_step + micro * cfg.batch
    perms = {p: torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + p))
             for p in range(start // n, (start + cfg.batch - 1) // n + 1)}     # the passes this batch spans
    return windows[[int(perms[j // n][j % n]) for j in range(start, start + cfg.batch)]]


def _save_state(state_dir, step, student, opt, sched, losses, seconds) -> None:
    """The progress of a run after ``step`` steps and ``seconds`` of training, written atomically
    into ``state_dir``."""
    from .paths import write_atomic

    state_dir.mkdir(parents=True, exist_ok=True)
    ckpt = state_dir / "recover_state.pt"
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"student": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "losses": losses, "seconds": seconds}, tmp)
    tmp.replace(ckpt)
    write_atomic(state_dir / "state.json", json.dumps({"step": step}))


def save_curve(state_dir: Path, curve: list) -> None:
    """Keep a run's perplexity curve [(step, tokens seen, perplexity)] in its state folder
    (``ppl_curve.json``, written atomically, the folder created if needed) so that ``--resume``
    continues it (:func:`resumed_curve`). Raises: OSError if the folder cannot be written."""
    from .paths import write_atomic

    write_atomic(state_dir / "ppl_curve.json", json.dumps(curve))


def resumed_curve(state_dir: Path) -> list:
    """The perplexity points (:func:`save_curve`) an interrupted run recorded up to its last
    checkpoint (:func:`_save_state`); later points are measured again when the steps after the
    checkpoint rerun. [] when the folder holds no curve or no checkpoint."""
    f, st = state_dir / "ppl_curve.json", state_dir / "state.json"
    if not (f.is_file() and st.is_file()):
        return []
    step = json.loads(st.read_text())["step"]
    return [tuple(x) for x in json.loads(f.read_text()) if x[0] <= step]


def _load_state(ckpt, student, opt, sched):
    """Resume from ``ckpt`` (:func:`_save_state`) if it exists. Returns (start step, losses,
    resumed-from step or None, training seconds before the resume)."""
    if ckpt is None or not ckpt.exists():
        return 0, [], None, 0.0
    st = torch.load(ckpt, weights_only=False)
    student.load_state_dict(st["student"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return st["step"], st["losses"], st["step"], float(st.get("seconds", 0.0))


def _micro_loss(student, teacher, x, cfg: RecoverConfig):
    """The distillation loss of one micro-batch x (batch, seqlen) int64 (bf16 autocast on a GPU)."""
    hidden = cfg.hidden_weight > 0
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with amp:
        with torch.no_grad():
            t_out = teacher(x, output_hidden_states=hidden)
        s_out = student(x, output_hidden_states=hidden)
    loss = kl_loss(s_out.logits, t_out.logits, float(cfg.temperature))
    if hidden:
        loss = loss + float(cfg.hidden_weight) * squarehead_loss(s_out.hidden_states[1:], t_out.hidden_states[1:])
    return loss


def _prepare(student, teacher, masks, cfg: RecoverConfig):
    """What trains (adapters for ``lora``), the frozen teacher, gradient checkpointing, AdamW and
    its warmup + cosine schedule. Returns (adapter owners, optimizer, scheduler)."""
    from transformers import get_cosine_schedule_with_warmup

    owners = add_masked_lora(student, masks, int(cfg.lora_rank), int(cfg.seed)) if cfg.train == "lora" else []
    _trainable(student, cfg.train)
    teacher.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        student.config.use_cache = False
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    return owners, opt, get_cosine_schedule_with_warmup(opt, int(cfg.warmup), int(cfg.steps))


def _backward(model, teacher, windows, step: int, cfg: RecoverConfig, ranks, device) -> float:
    """The gradients of one optimizer step: this process's share of its ``grad_accum`` micro-batches
    (DDP synchronises on the last one). Returns this process's part of the step's mean loss."""
    accum, total = int(cfg.grad_accum), 0.0
    mine = range(ranks.rank, accum, ranks.world)
    for i, micro in enumerate(mine):
        sync = model.no_sync() if ranks.world > 1 and i < len(mine) - 1 else contextlib.nullcontext()
        with sync:
            loss = _micro_loss(model, teacher, _batch(windows, step, micro, cfg).to(device), cfg)
            (loss * (ranks.world / accum)).backward()     # DDP averages over the processes
        total += float(loss.detach()) / accum
    return total


def recover_model(student, teacher, tokenizer, teacher_tokenizer, cfg: RecoverConfig, names: list[str],
                  state_dir=None, progress: bool = True, ranks=None, on_step=None) -> dict:
    """Distil ``teacher`` into the pruned ``student`` in place, keeping its mask (module docstring).

    Args: student, teacher: causal LMs on the same device (float32 or bf16). tokenizer,
        teacher_tokenizer: theirs (must agree). cfg: :class:`RecoverConfig`. names: the student's
        pruned layers. state_dir: folder for the progress (``<output>.partial``; None = no checkpoints);
        an existing ``recover_state.pt`` there is resumed; only the main process writes it. progress:
        tqdm bar. ranks: :class:`sparsefw.distributed.Ranks` of a multi-process run (DDP: every step's
        ``grad_accum`` micro-batches are split across the processes, which must divide it; the
        gradients are averaged, so the result equals one process's up to float summation order).
        on_step: called as ``on_step(step, student)`` after every optimizer step on every process
        (e.g. a perplexity curve); the student is in eval mode during the call, and its time does
        not count in ``seconds`` or the ``minutes`` budget (both include the training time before a
        resume).
    Returns: the recovery report {"steps", "tokens", "seconds", "losses" [(step, loss)], "sparsity",
        "resumed_from", "stopped_early", settings}.
    Raises: SparseFWError for bad settings, a teacher with another vocabulary, a non-sparse student,
        ``grad_accum`` not divisible by the number of processes.
    """
    from tqdm.auto import tqdm

    from .calibration import calibration_windows
    from .distributed import Ranks, all_max, all_sum, barrier, raise_if_any

    cfg.validate()
    ranks = ranks or Ranks()
    raise_if_any(SparseFWError(f"--grad-accum {cfg.grad_accum} must be a multiple of the {ranks.world} processes "
                               "(each step's micro-batches are split across them)")
                 if int(cfg.grad_accum) % ranks.world else None, ranks)
    masks = param_masks(student, names)
    sparsity = _check_pair(student, teacher, tokenizer, teacher_tokenizer, masks)
    owners, opt, sched = _prepare(student, teacher, masks, cfg)
    windows = calibration_windows(tokenizer, cfg.calib, int(cfg.nsamples), int(cfg.seqlen), int(cfg.seed))
    ckpt = None if state_dir is None else state_dir / "recover_state.pt"
    start, losses, resumed, before = _load_state(ckpt, student, opt, sched)
    device = next(student.parameters()).device
    model = student
    if ranks.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    student.train()
    t0, step = time.perf_counter() - before, start          # the budget spans resumes
    bar = tqdm(range(start, int(cfg.steps)), desc="recover", unit="step", disable=not (progress and ranks.is_main))
    for step in bar:
        total = _backward(model, teacher, windows, step, cfg, ranks, device)
        apply_masks(masks, grads=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            apply_masks(masks)
        total = all_sum([total], ranks)[0]
        losses.append((step + 1, total))
        if on_step is not None:              # its time (e.g. evaluation) is not training time
            t1 = time.perf_counter()
            student.eval()
            on_step(step + 1, student)
            student.train()
            t0 += time.perf_counter() - t1
        seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{(step + 1 - start) * cfg.tokens_per_step / max(seconds - before, 1e-9):.0f}")
        over = float(cfg.minutes) > 0 and all_max([seconds], ranks)[0] > 60 * float(cfg.minutes)
        if ckpt is not None and ranks.is_main and step + 1 < int(cfg.steps) and \
                ((step + 1) % int(cfg.checkpoint_every) == 0 or over):
            _save_state(state_dir, step + 1, student, opt, sched, losses, seconds)
        if over:
            break
    barrier(ranks)
    done = len(losses)
    merge_masked_lora(owners)
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    student.eval()
    return {**asdict(cfg), "steps": done, "steps_planned": int(cfg.steps), "tokens": done * cfg.tokens_per_step,
            "seconds": time.perf_counter() - t0, "losses": losses, "sparsity": sparsity, "resumed_from": resumed,
            "stopped_early": done < int(cfg.steps)}
