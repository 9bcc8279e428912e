"""``make experiments-test`` (``pytest experiments/tests``): the experiment scripts import as top-level modules
(``import quality``, ``import diagnose``), as they do when run as ``python experiments/quality.py``. The root's
``pytest`` / ``make test`` never load this file: pyproject's ``testpaths`` is ``tests`` alone."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
