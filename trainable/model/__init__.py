"""The promoted model's code: what `esc50 promote` ships whole with every registered version
(features, networks, augmentation, checkpoints, serving policy, the fold ensemble and its MLflow
entry file). It imports only torch, torchaudio, numpy, pandas, soundfile and MLflow, never the
rest of this project, so the model loads where the project is not installed."""
