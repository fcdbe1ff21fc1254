"""The promoted model's entry point, logged as an MLflow "model from code".

MLflow copies this file into the model (`code/pyfunc_entry.py`) and runs it when the model loads,
with the model's `code/` directory (the shipped `trainable/` package) on sys.path; it names the
pyfunc with `set_model`. The model therefore holds no pickled Python object: its code is these
source files, its weights are plain state dicts read with `torch.load(weights_only=True)`.
"""

import mlflow.models

from trainable.model.ensemble import EnsembleModel

mlflow.models.set_model(EnsembleModel())
