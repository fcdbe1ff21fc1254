"""The fold ensemble's import path before the model's code moved to trainable/model/. Versions
registered earlier name `trainable.ensemble.EnsembleModel` (in their entry file, or their pickle);
where this project's `trainable` is imported first, `esc50 predict` loads them through this name."""

from trainable.model.ensemble import EnsembleModel, FoldEnsemble

__all__ = ["EnsembleModel", "FoldEnsemble"]
