"""`esc50 main`: the whole path on embedded defaults, prepare -> search -> promote.

It only strings the public steps together, so what it does is what a user would type:
    esc50 prepare; esc50 search --space cpu ...; esc50 promote --search NAME
The defaults fit a 2-core CPU in about 15 minutes; on a GPU machine raise --trials/--epochs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from search.options import SearchOptions
from search.prepare import PrepareResult, prepare
from search.promote import Promotion, promote
from search.tune import SearchResult, run_search
from trainable.features import FeatureParams


@dataclass
class MainResult:
    prepared: PrepareResult
    search: SearchResult
    promoted: Promotion
    seconds: float


def run_main(
    source: str | None,
    search: SearchOptions,
    params: FeatureParams | None = None,
    workers: int = 2,
    model_name: str = "esc50-cnn",
) -> MainResult:
    """Prepare the shards (a no-op when up to date), run the search, promote its best trial."""
    t0 = time.perf_counter()
    params = params or FeatureParams()
    prepared = prepare(source, search.shards, params, workers=workers)
    print(prepared.summary(), flush=True)
    result = run_search(dataclasses.replace(search, shards=prepared.out))  # prints its own summary
    promoted = promote(search=result.name, tracking=result.tracking_uri, name=model_name)
    return MainResult(prepared, result, promoted, time.perf_counter() - t0)
