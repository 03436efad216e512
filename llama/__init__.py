"""Llama 2 on MindSpore: data preparation, model, conversion, training and evaluation.

The library has no Prefect or MLflow imports so it can be used from a notebook; `tasks/` and `flows/`
wrap it for orchestration and tracking.

Imports are at the top of each module, except MindSpore and the other heavy or optional libraries (and the
modules that import them), which load inside the functions that use them: importing any module, every
command's --help and the Prefect flow process stay light (tests/test_layout.py holds the rule).
"""

__version__ = "0.1.0"
