"""Run configuration: :class:`PruneConfig` (every setting of a pruning run) and the one YAML loader
of the project (CLI ``--config``, ``sparsefw compare``, ``cnn/``).

The CLI flags of ``sparsefw prune`` are generated from :class:`PruneConfig`'s fields (their
``help`` metadata) and from the options of the registered methods (:mod:`sparsefw.methods`), so a
setting is added in one place.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import SparseFWError


def _f(default, help: str, type=None, **kw):
    """A dataclass field with its CLI help (and type, where the default is None)."""
    return field(default=default, metadata={"help": help, "type": type or type_of(default), **kw})


def type_of(default):
    """The CLI type of a default value (bool, int, float or str)."""
    return type(default) if default is not None else str


@dataclass(init=False)
class PruneConfig:
    """Everything that defines a pruning run. The CLI flags and YAML keys have the fields' names
    (``_`` written ``-`` on the command line); ``options`` holds the method's own options
    (:class:`sparsefw.methods.Option`, e.g. ``alpha`` of ``sparsefw``), given as keywords like
    the fields: ``PruneConfig(method="sparsefw", alpha=0.8)``.

    Calibration default: 128 x 1024 windows of the offline ``wiki`` text (139k tokens; the
    literature's 128 x 2048 on C4 needs ``calib="c4"`` online).

    Raises (constructor): SparseFWError for a keyword that is neither a field nor a method option.
    """

    method: str = _f("sparsefw", "pruning method (see --help's list)")
    sparsity: float | None = _f(None, "fraction removed, in [0, 1) (default 0.5; an N:M pattern fixes it "
                                "at 1 - N/M)", type=float)
    pattern: str = _f("unstructured", "unstructured | per-matrix | N:M (2:4, 4:8)")
    reconstruct: bool = _f(False, "least-squares update of the kept weights after the mask is chosen")
    percdamp: float = _f(0.01, "dampening of G (fraction of its mean diagonal) for sparsegpt / --reconstruct")
    calib: str = _f("wiki", "calibration text: wiki | austen | boolq | c4 | wikitext2 | FILE")
    nsamples: int = _f(128, "calibration windows")
    seqlen: int = _f(1024, "tokens per calibration window")
    seed: int = _f(0, "seed of the calibration window draw")
    bos: str = _f("auto", "BOS at the start of every calibration window and perplexity chunk: auto (if the "
                  "tokenizer adds one: Llama, Gemma) | always | never (WikiText protocol)")
    device: str = _f("auto", "where blocks run and layers are solved: auto (CUDA if present) | cpu | cuda[:N]")
    dtype: str = _f("auto", "model dtype: auto (the checkpoint's) | float32 | bfloat16 | float16")
    offload_activations: bool = _f(False, "keep calibration activations on the CPU between blocks")
    owl: bool = _f(False, "OWL: one sparsity per block from its outlier ratio, mean = --sparsity (unstructured)")
    owl_m: float = _f(5.0, "OWL's M: a Wanda score above M x the block's mean is an outlier")
    owl_lambda: float = _f(0.08, "OWL's lambda: block sparsities span 2 lambda around --sparsity")
    true_sequential: bool = _f(False, "prune q/k/v, o, gate/up, down in turn, each fitted to the block's "
                               "inputs with the earlier ones pruned (slower)")
    min_expert_tokens: int = _f(32, "an MoE expert routed fewer calibration tokens than this is magnitude-pruned "
                                "(counted in the report)")
    drop_experts: int = _f(0, "MoE: remove this many experts per block, those with the lowest REAP score "
                           "(router-weighted expert activation), before pruning the rest")
    skip_unknown: bool = _f(False, "leave block weights of a form sparsefw cannot prune (e.g. unsupported fused "
                            "experts) dense, listed in the report, instead of failing")
    options: dict = field(default_factory=dict, metadata={"help": None})

    def __init__(self, **kw):
        from .methods import all_options

        opts = dict(kw.pop("options", None) or {})
        for f in fields(self):
            if f.name != "options":
                setattr(self, f.name, kw.pop(f.name, f.default))
        known = all_options()
        unknown = sorted(k for k in kw if k not in known)
        if unknown:
            raise SparseFWError(f"unknown option(s) {unknown}; valid: {sorted(RUN_FIELDS + tuple(known))}")
        opts.update(kw)
        self.options = opts

    def validate(self):
        """Check every setting; return the parsed :class:`sparsefw.masks.Pattern`.

        Raises: SparseFWError saying what to do (unknown method or option, an option the method
        does not have, sparsity outside [0, 1), N:M with a sparsity, bad device / dtype / BOS)."""
        from .calibration import BOS_MODES
        from .masks import parse_pattern
        from .methods import get_method
        from .models import resolve_device, resolve_dtype
        from .owl import check_owl_lambda

        get_method(self.method).resolve(self.options)
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        if self.bos not in BOS_MODES:
            raise SparseFWError(f"unknown BOS mode '{self.bos}': use one of {', '.join(BOS_MODES)}")
        for key in ("min_expert_tokens", "drop_experts"):
            if int(getattr(self, key)) < 0:
                raise SparseFWError(f"{key} must be >= 0, got {getattr(self, key)}")
        if int(self.nsamples) < 1 or int(self.seqlen) < 2:
            raise SparseFWError(f"nsamples must be >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")
        if self.owl:
            self._check_owl()
        if ":" in str(self.pattern):
            pat = parse_pattern(self.pattern)
            if self.sparsity is not None and abs(float(self.sparsity) - pat.sparsity) > 1e-9:
                raise SparseFWError(f"the N:M pattern {pat} fixes the sparsity at {pat.sparsity:.0%}; "
                                    f"drop --sparsity {self.sparsity} (or use --pattern unstructured)")
            self.sparsity = pat.sparsity
            return pat
        if self.sparsity is None:
            self.sparsity = 0.5
        pat = parse_pattern(self.pattern, self.sparsity)
        if self.owl:
            check_owl_lambda(float(self.sparsity), float(self.owl_lambda))
        return pat

    def _check_owl(self) -> None:
        if str(self.pattern) != "unstructured":
            raise SparseFWError(f"--owl sets one sparsity per block for --pattern unstructured; the pattern "
                                f"'{self.pattern}' fixes the sparsity of every row or matrix (drop --owl)")
        try:
            owl_m = float(self.owl_m)
        except (TypeError, ValueError):
            owl_m = float("nan")
        if not (math.isfinite(owl_m) and owl_m > 0):
            raise SparseFWError(f"--owl-m must be a number > 0 (OWL uses 5), got {self.owl_m!r}")

    def method_options(self) -> dict:
        """Every option of the configured method: given values and defaults (checked).
        Raises SparseFWError as :meth:`sparsefw.methods.Method.resolve`."""
        from .methods import get_method

        return get_method(self.method).resolve(self.options)

    def report_fields(self) -> dict:
        """The settings as a flat report dict: the run fields and every option of the method
        (other methods' options are absent; OWL's M and lambda are None without OWL)."""
        d = {k: v for k, v in asdict(self).items() if k != "options"}
        d.update(self.method_options())
        if not self.owl:
            d["owl_m"] = d["owl_lambda"] = None
        return d


RUN_FIELDS = tuple(f.name for f in fields(PruneConfig) if f.name != "options")


def load_yaml(path: str | Path, required: tuple[str, ...] = (), example: str | None = None) -> dict:
    """Read a YAML config file holding a mapping of option: value.

    Keys are returned with ``-`` replaced by ``_`` (``ppl-chunks`` and ``ppl_chunks`` are the same
    option).

    Args:
        path: the YAML file. required: keys that must be present. example: a config file to name
            in the error messages (e.g. ``configs/compare_smollm2.yaml``).
    Returns: the mapping (dict; an empty file gives ``{}``).
    Raises: SparseFWError if the file is missing, not valid YAML, not a mapping, or lacks a
        required key.
    """
    import yaml

    see = f" (see {example})" if example else ""
    p = Path(path)
    if not p.is_file():
        raise SparseFWError(f"config file '{path}' not found{see}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SparseFWError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SparseFWError(f"config file '{path}' must hold a mapping of option: value{see}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for k in required:
        if k not in data:
            raise SparseFWError(f"config file '{path}' needs a '{k}' entry{see}")
    return data
