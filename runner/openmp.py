"""The OpenMP spin setting runners use, applied before torch loads libgomp.

After a parallel region, libgomp's idle threads busy-wait for GOMP_SPINCOUNT
iterations before they sleep. With its default of 300,000, one of the two
cores of the benchmark machine stayed busy for about 8 ms after every CPU
predict, time the web server and Redis needed to return the result. With
10,000 the predict was as fast and the spin stopped (bench/omp_spin.py,
docs/benchmarks.md). libgomp reads the variable once, when it is loaded, so
this module uses only the standard library and must run before
``import torch``.
"""

import os
import sys

SPINCOUNT_VARIABLE = "GOMP_SPINCOUNT"
DEFAULT_SPINCOUNT = "10000"


def apply_spin_default() -> str | None:
    """Set GOMP_SPINCOUNT unless the environment sets it; return the value in force.

    Returns None, and changes nothing, when torch is already imported,
    because libgomp has read the environment by then.
    """
    if "torch" in sys.modules:
        return os.environ.get(SPINCOUNT_VARIABLE)
    return os.environ.setdefault(SPINCOUNT_VARIABLE, DEFAULT_SPINCOUNT)
