"""Command line: ``sparsefw prune | recover | eval-ppl | eval-zeroshot | compare | push | inspect``.

Prune flags are generated from :class:`sparsefw.config.PruneConfig` and the registered methods'
options (:mod:`sparsefw.methods`); ``--config FILE.yaml`` sets defaults
(keys = flag names with ``_`` or ``-``) and explicit flags override it. Bad input prints one line
``error: ...`` and exits with code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import load_yaml
from .errors import SparseFWError
from .paths import write_atomic


def _flag(p: argparse.ArgumentParser, name: str, default, help: str, typ, choices=None) -> None:
    """One ``--name`` option (``_`` -> ``-``) with default None, so that a config file's value
    or the method's default applies unless the flag is given; booleans get ``--no-name`` too.
    Values are checked by :class:`sparsefw.config.PruneConfig` (one ``error:`` line), not here."""
    flag = "--" + name.replace("_", "-")
    shown = (f"; one of {', '.join(map(str, choices))}" if choices else "") + \
        (f" (default {default})" if default is not None else "")
    if typ is bool:
        p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help + shown)
    else:
        p.add_argument(flag, dest=name, type=str if choices else typ, default=None, metavar=name.upper(),
                       help=help + shown)


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    """The run settings (fields of :class:`sparsefw.config.PruneConfig`) and every registered
    method's options (:mod:`sparsefw.methods`) as flags, then the prune command's own."""
    from dataclasses import fields

    from .config import PruneConfig
    from .methods import METHODS, all_options

    p.add_argument("--model", help="packaged name (smollm2-135m, gemma3-270m), local folder or hub id")
    for f in fields(PruneConfig):
        if f.metadata.get("help") is None:
            continue
        help = f.metadata["help"]
        if f.name == "method":
            help = "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
        _flag(p, f.name, f.default, help, f.metadata["type"],
              choices=list(METHODS) if f.name == "method" else None)
    g = p.add_argument_group("method options (each applies to the methods named)")
    for o in all_options().values():
        owners = ", ".join(m.name for m in METHODS.values() if o in m.options)
        _flag(g, o.name, o.default, f"{o.help} [{owners}]", o.type, o.choices)
    p.add_argument("--stream", action="store_true", help="checkpoints larger than memory: read each block "
                   "from the safetensors when reached, write it to --output, never hold the whole model")
    p.add_argument("--output", help="folder for the pruned checkpoint, report.json and README.md")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (and the "
                   "progress of an interrupted run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same options and "
                   "--output from its last finished block (progress kept in OUTPUT.partial)")
    p.add_argument("--eval-ppl", dest="eval_ppl", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--ppl-source", dest="ppl_source", default="boolq", help="held-out text: boolq | wikitext2 | FILE")
    p.add_argument("--ppl-seqlen", dest="ppl_seqlen", type=int, default=None, help="default: --seqlen")
    p.add_argument("--ppl-chunks", dest="ppl_chunks", type=int, default=64, help="chunks evaluated (0 = all)")
    p.add_argument("--zeroshot", default=None, help="comma-separated lm-eval tasks to run on the pruned model")
    p.add_argument("--zeroshot-limit", dest="zeroshot_limit", type=int, default=None)
    p.add_argument("--max-shard-size", dest="max_shard_size", default="5GB",
                   help="split saved safetensors above this size (transformers' max_shard_size)")
    p.add_argument("--push-to-hub", dest="push_to_hub", default=None, metavar="USER/NAME",
                   help="upload --output to the Hugging Face Hub afterwards (token: HF_TOKEN or 'hf auth login')")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def _config_args(args) -> dict:
    """The PruneConfig settings and method options given on the command line or in --config
    (flags left at None are not given: the defaults apply)."""
    from .config import RUN_FIELDS
    from .methods import all_options

    names = list(RUN_FIELDS) + list(all_options())
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsefw`` argument parser: subcommands prune, eval-ppl, eval-zeroshot, push,
    inspect, compare (options in README.md, "CLI")."""
    ap = argparse.ArgumentParser(prog="sparsefw", description="Prune causal LMs with Frank-Wolfe (SparseFW).")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and save it")
    p.add_argument("--config", help="YAML file of defaults (flags override)")
    _add_prune_args(p)
    e = sub.add_parser("eval-ppl", help="perplexity of a model on held-out text")
    e.add_argument("--model", required=True)
    e.add_argument("--source", default="boolq")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--chunks", type=int, default=64, help="0 = all")
    e.add_argument("--bos", default="auto", help="auto | always | never (see prune --bos)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16")
    z = sub.add_parser("eval-zeroshot", help="lm-eval zero-shot accuracy (offline tasks when no hub)")
    z.add_argument("--model", required=True)
    z.add_argument("--tasks", default="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    z.add_argument("--limit", type=int, default=None)
    z.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    z.add_argument("--output", default=None, help="write the results JSON here")
    z.add_argument("--resume-dir", dest="resume_dir", default=None,
                   help="score in shards, keep each finished shard here, resume from them")
    z.add_argument("--shard-size", dest="shard_size", type=int, default=1000,
                   help="documents per shard with --resume-dir")
    u = sub.add_parser("push", help="upload a pruned checkpoint folder to the Hugging Face Hub")
    u.add_argument("folder", help="output folder of 'sparsefw prune'")
    u.add_argument("--repo-id", dest="repo_id", required=True, help="USER/NAME (or ORG/NAME)")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    u.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the repo id, the files with sizes and the card; send nothing")
    i = sub.add_parser("inspect", help="sparsity of a checkpoint from its safetensors (no model build)")
    i.add_argument("path", help="checkpoint folder or hub id")
    i.add_argument("--pattern", default=None, help="N:M pattern to check in every pruned layer, e.g. 2:4")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--layers", action="store_true", help="list every layer in the text output")
    r = sub.add_parser("recover", help="distil the dense model into a pruned one, keeping its mask")
    r.add_argument("--model", required=True, help="the pruned checkpoint (output of sparsefw prune)")
    r.add_argument("--teacher", required=True, help="the dense model it was pruned from")
    r.add_argument("--output", required=True)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT.partial")
    r.add_argument("--eval-ppl", dest="eval_ppl", action="store_true", help="perplexity before and after")
    r.add_argument("--ppl-source", dest="ppl_source", default="boolq")
    r.add_argument("--ppl-seqlen", dest="ppl_seqlen", type=int, default=512)
    r.add_argument("--ppl-chunks", dest="ppl_chunks", type=int, default=64, help="chunks evaluated (0 = all)")
    r.add_argument("--ppl-every", dest="ppl_every", type=int, default=0,
                   help="with --eval-ppl: also every N steps (the perplexity curve against tokens seen)")
    from dataclasses import fields as _fields

    from .recover import RecoverConfig
    for f in _fields(RecoverConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            r.add_argument(flag, dest=f.name, action="store_const", const=True, default=None)
        else:
            r.add_argument(flag, dest=f.name, type=type(f.default), default=None, help=f"(default {f.default})")
    c = sub.add_parser("compare", help="methods x sparsities table (see configs/compare_smollm2.yaml)")
    c.add_argument("--config", required=True)
    c.add_argument("--output", default=None)
    c.add_argument("--report-only", dest="report_only", action="store_true",
                   help="write the table from the finished cells without pruning any (progress check)")
    c.add_argument("--cell", dest="cells", action="append", default=None, metavar="ID",
                   help="run only this cell (repeatable), e.g. sparsefw__0.6__s1: reproduce one cell")
    return ap


def _parse(argv):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "prune" and args.config:
        conf = load_yaml(args.config)
        sub = ap._subparsers._group_actions[0].choices["prune"]  # noqa: SLF001
        valid = {a.dest for a in sub._actions}  # noqa: SLF001
        bad = set(conf) - valid
        if bad:
            raise SparseFWError(f"config '{args.config}' has unknown keys {sorted(bad)}")
        sub.set_defaults(**conf)
        args = ap.parse_args(argv)
    return args


def _print_summary(rep: dict) -> None:
    pat = rep["pattern"] if ":" in str(rep["pattern"]) else f"{rep['sparsity']:.0%} {rep['pattern']}"
    from .methods import METHODS

    m = METHODS.get(rep["method"])
    opts = m.options_text(rep) if m else ""
    print(f"\n== {rep['model']}: {rep['method']}" + (f" ({opts})" if opts else "")
          + f", {pat}" + (" + reconstruction" if rep.get("reconstruct") else ""))
    print(f"achieved sparsity {rep['achieved_sparsity']:.4f} over {rep['total']:,} weights; "
          f"pruning took {rep['seconds']:.0f} s")
    print(f"mean relative layer error {rep['mean_error_final']:.4f} (Wanda mask on the same inputs "
          f"{rep['mean_error_wanda']:.4f}; {100 * rep['error_reduction_vs_wanda']:+.1f}% reduction)")
    if "ppl" in rep:
        p = rep["ppl"]
        print(f"perplexity ({p['source']}, {p['chunks']}x{p['seqlen']} tokens, bos {p.get('bos', 'never')}): dense {p['dense']:.3f} -> "
              f"pruned {p['pruned']:.3f}")
    if rep.get("zeroshot"):
        print(f"zero-shot mean accuracy: {rep['zeroshot'].get('mean_acc')}")


def _recover(args) -> None:
    """``sparsefw recover``: :func:`sparsefw.api.recover` with the given RecoverConfig flags; a summary."""
    from . import api
    from .recover import RecoverConfig

    conf = {k: getattr(args, k) for k in RecoverConfig.__dataclass_fields__ if getattr(args, k) is not None}
    res = api.recover(args.model, args.teacher, args.output, overwrite=args.overwrite, resume=args.resume,
                      eval_ppl=args.eval_ppl, ppl_source=args.ppl_source, ppl_seqlen=args.ppl_seqlen,
                      ppl_chunks=args.ppl_chunks or None, ppl_every=args.ppl_every, **conf)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rec = res.report["recovery"]
    print(f"recovered {rec['steps']} steps ({rec['tokens']:,} tokens) in {rec['seconds']:.0f} s"
          + (f" (stopped at the {rec['minutes']:g}-minute budget)" if rec.get("stopped_early") else "") + "; sparsity "
          f"{rec['achieved_sparsity']:.4f}" + (f"; perplexity {rec['ppl_before']:.3f} -> {rec['ppl_after']:.3f}"
                                               if "ppl_after" in rec else ""))
    print(f"saved to {Path(args.output).resolve()} (report.json, README.md)")


def main(argv=None) -> int:
    """Entry point of the ``sparsefw`` command. Returns the exit code: 0 on success, 2 with one
    ``error: …`` line for bad input (``SparseFWError``), 1 for a failed ``inspect --pattern`` check."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = _parse(argv)
        if getattr(args, "verbose", False):
            logging.getLogger("sparsefw").setLevel(logging.INFO)
        if args.cmd == "prune":
            from . import api

            if not args.model:
                raise SparseFWError("--model is required (e.g. --model smollm2-135m)")
            conf = _config_args(args)
            tasks = [t for t in (args.zeroshot or "").split(",") if t]
            res = api.prune(args.model, output=args.output, overwrite=args.overwrite, eval_ppl=args.eval_ppl,
                            ppl_source=args.ppl_source, ppl_seqlen=args.ppl_seqlen,
                            ppl_chunks=args.ppl_chunks or None, zeroshot=tasks or None,
                            zeroshot_limit=args.zeroshot_limit, stream=args.stream,
                            max_shard_size=args.max_shard_size, push_to_hub=args.push_to_hub,
                            private=args.private, resume=args.resume, **conf)
            if int(os.environ.get("RANK", "0")) != 0:
                return 0
            _print_summary(res.report)
            if args.output:
                print(f"saved to {Path(args.output).resolve()} (report.json, README.md)")
            if res.report.get("pushed"):
                print(f"pushed to {res.report['pushed'].get('url')}")
        elif args.cmd == "push":
            from .publish import format_plan, push

            plan = push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                        dry_run=args.dry_run)
            card = Path(args.folder) / "README.md"
            print(format_plan(plan, card.read_text() if args.dry_run and card.exists() else None))
            if not args.dry_run:
                print(f"pushed to {plan.get('url')}")
        elif args.cmd == "inspect":
            from .inspection import format_inspection, inspect_checkpoint

            info = inspect_checkpoint(args.path, pattern=args.pattern)
            print(json.dumps(info, indent=2) if args.json else format_inspection(info, per_layer=args.layers))
            if info["pattern_holds"] is False:
                return 1             # a failed N:M check exits 1 (scripts can gate on it)
        elif args.cmd == "eval-ppl":
            from . import api

            out = api.eval_ppl(args.model, args.source, args.seqlen, args.chunks or None, bos=args.bos,
                               device=args.device, dtype=args.dtype)
            print(json.dumps(out, indent=2))
        elif args.cmd == "eval-zeroshot":
            from . import api
            from .zeroshot import format_zeroshot_table

            out = api.eval_zeroshot(args.model, [t for t in args.tasks.split(",") if t], args.limit,
                                    args.batch_size, args.resume_dir, args.shard_size)
            print(format_zeroshot_table(out))
            if args.output:
                write_atomic(Path(args.output), json.dumps(out, indent=2))
        elif args.cmd == "recover":
            _recover(args)
        elif args.cmd == "compare":
            from .compare import run_compare

            run_compare(args.config, args.output, report_only=args.report_only, only=args.cells)
    except SparseFWError as e:
        if int(os.environ.get("RANK", "0")) == 0:   # several processes: one error line, from the main one
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
        else:      # torchrun stops every process when one exits: give the main one time to print the line
            time.sleep(3)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
