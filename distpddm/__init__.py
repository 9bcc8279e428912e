"""distpddm: distributed deep metric learning with PDDM hard quadruplet mining.

The public names are imported on first use, so the command line's data tools (``distpddm shards``) and
the shard builder's worker processes never import torch (a CUDA build holds ~700 MB per process).
"""

from importlib import import_module

_PUBLIC = {
    "PDDM": ".pddm",
    "PDDMLoss": ".loss",
    "Euclidean": ".metrics",
    "Mahalanobis": ".metrics",
    "Quadruplets": ".miners",
    "HardQuadrupletMiner": ".miners",
    "SemiHardQuadrupletMiner": ".miners",
    "BatchHardestQuadrupletMiner": ".miners",
    "MeanReducer": ".reducers",
    "AvgNonZeroReducer": ".reducers",
    "Pool": ".pool",
    "CrossDevice": ".wrappers",
    "CrossBatchMemory": ".wrappers",
    "PMLLoss": ".pml",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module 'distpddm' has no attribute {name!r}")
