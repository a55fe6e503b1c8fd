"""The one YAML config loader of the project (CLI ``--config``, ``sparsefw compare``, ``cnn/``)."""
from __future__ import annotations

from pathlib import Path

from .errors import SparseFWError


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
