"""Triton kernels of minaction (installed as ``minaction.kernels``)."""
if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/backends/test_select.py
    # Imported as a top-level package: Python was started in the repository root, whose ``kernels/``
    # then shadows the PyPI package ``kernels`` (a dependency of transformers, which imports it).
    # Load that package in this module's place when it is installed; otherwise there is no ``kernels``.
    def _step_aside() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            raise ImportError("No module named 'kernels' (the repository's kernels/ folder is minaction.kernels, "
                              "not a top-level package)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds after this runs
        spec.loader.exec_module(module)

    _step_aside()
    del _step_aside
