"""SparseFW: post-training pruning of neural networks with Frank-Wolfe.

Pure tensor functions: :mod:`sparsefw.masks` (patterns, saliency, selection/LMO), :mod:`sparsefw.fw`
(objective, FW solver), :mod:`sparsefw.swaps`, :mod:`sparsefw.sparsegpt_sparsify`,
:mod:`sparsefw.reconstruct`, behind one method interface, :mod:`sparsefw.methods` (the registry).
Model plumbing (capture, block driver, saving, evaluation) lives in the other modules.
"""
__version__ = "0.1.0"

from .errors import SparseFWError  # noqa: F401
