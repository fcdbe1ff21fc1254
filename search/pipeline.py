"""`esc50 main`: the whole path on embedded defaults, prepare -> search -> promote.

It only strings the public steps together, so what it does is what a user would type:
    esc50 prepare; esc50 search --space cpu ...; esc50 promote --search NAME
The defaults are `make run`'s: they fit a 2-core CPU; on a GPU machine raise --trials/--epochs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.options import SearchOptions

if TYPE_CHECKING:
    from search.data.prepare import PrepareResult
    from search.release.promote import Promotion
    from search.tune import SearchResult
    from trainable.model.features import FeatureParams

# `esc50 main`'s search (what `make run` runs); --smoke replaces trials and epochs with its own.
# One trial of the `cpu` recipe is what 15 minutes on 2 cores buy (README, the main job).
MAIN_SPACE = "cpu"
MAIN_TRIALS = 1
MAIN_EPOCHS: int | None = None  # the space's own (15 for `cpu`)


@dataclass
class MainResult:
    prepared: PrepareResult
    search: SearchResult
    promoted: Promotion | None  # None: interrupted (Ctrl-C) in the search or the promotion
    seconds: float

    def next_commands(self) -> str:
        """How to go on after Ctrl-C: resume the search if it was stopped, then promote its best trial
        (the one step left when the Ctrl-C came after the search had ended)."""
        s = self.search
        promote = f"esc50 promote --search {s.name} --tracking-uri {s.tracking_uri}"
        if not s.interrupted:
            return promote
        return f"esc50 search --resume {s.name} --storage {s.options.storage} && {promote}"


def main_options(
    name: str | None = None,
    space: str = MAIN_SPACE,
    trials: int | None = None,
    epochs: int | None = None,
    tracking_uri: str | None = None,
    gpus_per_fold: float = 0.0,
    smoke: bool = False,
) -> SearchOptions:
    """The search of `esc50 main`: the embedded defaults where a value is not given."""
    return SearchOptions(
        name=name or "main-" + time.strftime("%Y%m%d-%H%M%S"),
        space=space,
        # unset under --smoke: the smoke defaults fill them (search/options.py)
        trials=trials if trials is not None or smoke else MAIN_TRIALS,
        epochs=epochs if epochs is not None or smoke else MAIN_EPOCHS,
        tracking_uri=tracking_uri,
        gpus_per_fold=gpus_per_fold,
        smoke=smoke,
    )


def run_main(
    source: str | None,
    search: SearchOptions,
    params: FeatureParams | None = None,
    workers: int = 2,
    model_name: str = "esc50-cnn",
) -> MainResult:
    """Prepare the shards (a no-op when up to date), run the search, promote its best trial. After a
    Ctrl-C nothing is promoted (`promoted` None): an interrupted search is resumed first, and a Ctrl-C
    during the promotion leaves the finished search to `esc50 promote`."""
    from search.data.prepare import prepare
    from search.release.promote import promote
    from search.tune import run_search
    from trainable.model.features import FeatureParams

    t0 = time.perf_counter()
    params = params or FeatureParams()
    prepared = prepare(source, search.shards, params, workers=workers)
    print(prepared.summary(), flush=True)
    result = run_search(dataclasses.replace(search, shards=prepared.out))  # prints its own summary
    if result.interrupted:
        return MainResult(prepared, result, None, time.perf_counter() - t0)
    try:
        promoted = promote(search=result.name, tracking=result.tracking_uri, name=model_name)
    except KeyboardInterrupt:  # the search is whole; its promotion run ends KILLED/FAILED, re-run it
        return MainResult(prepared, result, None, time.perf_counter() - t0)
    return MainResult(prepared, result, promoted, time.perf_counter() - t0)
