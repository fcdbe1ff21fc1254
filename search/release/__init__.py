"""The release step: a search's best trial -> the registered champion (promote.py, oof.py,
champion.py) -> predictions (predict.py)."""
