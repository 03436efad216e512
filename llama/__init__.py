"""Llama 2 on MindSpore: data preparation, model, conversion, training and evaluation.

The library has no Prefect or MLflow imports so it can be used from a notebook; `tasks/` and `flows/`
wrap it for orchestration and tracking.
"""

__version__ = "0.1.0"
