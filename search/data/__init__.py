"""The data step: an ESC-50 copy (source.py, metadata.py) -> Parquet log-mel shards (prepare.py)."""
