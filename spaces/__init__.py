"""Named search spaces (Optuna define-by-run functions over TrainConfig keys) and user space files.

    from spaces import load_space, names
    space = load_space("default")            # or "path/to/file.py[:function]"

See spaces/builtin.py for the spaces and spaces/registry.py for loading, checking and describing.
"""

from spaces.builtin import SPACES
from spaces.registry import Space, SpaceInfo, load_space, names

__all__ = ["SPACES", "Space", "SpaceInfo", "load_space", "names"]
