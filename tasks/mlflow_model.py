"""The registered model as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/NAME/VERSION")
.predict(["prompt", ...])` returns the completions, in any process with this project's dependencies.

MLflow logs this file as "model code" (executed at load time, not pickled) with the `llama` package as its
code path and the checkpoint folder as an artifact, so a registered version carries everything it runs.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

GENERATION_PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}


class LlamaGenerator(PythonModel):
    """Prompts in (a list of strings, or a one-column DataFrame of them), completions out."""

    def load_context(self, context) -> None:
        from llama.eval.predict import Predictor  # deferred: MLflow puts the code path on sys.path after this file loads

        self.predictor = Predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        prompts = model_input.iloc[:, 0] if isinstance(model_input, pd.DataFrame) else model_input
        settings = {**GENERATION_PARAMS, **(params or {})}
        completions = self.predictor.complete([str(p) for p in prompts], **settings)
        return [c["completion"] for c in completions]


mlflow.models.set_model(LlamaGenerator())
