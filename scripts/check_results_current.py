"""Check that every result cell of the results configs was made by the current code.

For each config (default: every ``configs/results_*.yaml``), each of its cells must exist under the
config's output folder (``cells/<id>.json``) and record ``code`` equal to
:func:`sparsefw.report.code_version` of this checkout: the commit that last changed ``sparsefw/``
(so commits of docs, scripts or results keep cells current; a ``+dirty`` cell never is). Prints
one line per config and every stale or missing cell; exit status 1 if any, 0 otherwise.

    .venv/bin/python scripts/check_results_current.py [CONFIG ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(config: str, current: str) -> list[str]:
    """Problems of one config's cells: ``missing <id>`` or ``stale <id> (code X)``."""
    from sparsefw.compare import cell_ids

    out, ids = cell_ids(config)
    out = out if out.is_absolute() else ROOT / out
    problems = []
    for cid in ids:
        f = out / "cells" / f"{cid}.json"
        if not f.exists():
            problems.append(f"missing {cid}")
            continue
        code = json.loads(f.read_text()).get("code")
        if code != current:
            problems.append(f"stale {cid} (code {code})")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="comparison configs (default: configs/results_*.yaml)")
    a = ap.parse_args(argv)
    from sparsefw.report import code_version

    configs = a.configs or sorted(str(p) for p in (ROOT / "configs").glob("results_*.yaml"))
    current = code_version()
    bad = 0
    print(f"current code version: {current}")
    for cfg in configs:
        problems = check(cfg, current)
        print(f"{cfg}: {'all cells current' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p}")
        bad += len(problems)
    return 1 if bad or not configs else 0


if __name__ == "__main__":
    sys.exit(main())
