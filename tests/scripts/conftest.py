"""Fixtures of the script tests: ``script(name)`` loads scripts/<name>.py as a module (the scripts are
plain files, not a package)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="session")
def script():
    """Loader: ``script("bench_scale")`` -> the module of scripts/bench_scale.py (loaded once)."""
    cache = {}

    def load(name: str):
        if name not in cache:
            spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
            cache[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(cache[name])
        return cache[name]
    return load
