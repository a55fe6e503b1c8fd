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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(config: str, current: str, root: Path = ROOT) -> list[str]:
    """Problems of one config's cells (its relative output folder taken under ``root``):
    ``missing <id>`` or ``stale <id> (code X)``."""
    from sparsefw.compare import finished_cells

    _, _, cells = finished_cells(config, base=root)
    return [f"missing {cid}" if cell is None else f"stale {cid} (code {cell.get('code')})"
            for cid, cell in cells.items() if cell is None or cell.get("code") != current]


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
