"""``python -m sparsefw ...`` (e.g. under ``torchrun --nproc_per_node N -m sparsefw prune ...``)."""
import sys

from .cli import main

sys.exit(main())
