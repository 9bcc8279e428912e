"""distpddm: distributed deep metric learning with PDDM hard quadruplet mining."""

from .loss import LossStats, PDDMLoss
from .metrics import Euclidean, Mahalanobis
from .mining import Quadruplets, mine_quadruplets
from .pddm import PDDM

__all__ = ["PDDM", "PDDMLoss", "LossStats", "Euclidean", "Mahalanobis", "Quadruplets", "mine_quadruplets"]
__version__ = "0.1.0"
