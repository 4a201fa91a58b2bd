"""The GPU machine's image, emulated: on PYTHONPATH, this hides the packages that image lacks.

Python imports `sitecustomize` at start-up (in this process and in every subprocess that inherits PYTHONPATH).
Each import finder is wrapped so that it does not find polars, dagster, mlflow, trl or datasets: `import polars`
raises ModuleNotFoundError and `importlib.util.find_spec("polars")` is None, as where they are not installed
(transformers and accelerate probe optional packages with find_spec). `tests/test_gpu_smoke.py` uses it.
"""

import os
import sys

ABSENT = frozenset(os.environ.get("GPU_IMAGE_ABSENT", "polars,dagster,mlflow,trl,datasets").split(","))


class _Hiding:
    """A finder that finds nothing of ABSENT and defers everything else to the finder it wraps."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self._finder, attribute)


sys.meta_path[:] = [_Hiding(finder) if hasattr(finder, "find_spec") else finder for finder in sys.meta_path]
