"""What a benchmark ran on, printed and saved with every result (timings mean little without it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def provenance() -> dict[str, Any]:
    """What makes a result re-derivable: the command line, the code's git commit (and whether the
    checkout was dirty), the versions of this package and of torch, Ray, Optuna and MLflow, the time."""
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from search.provenance import git_state, versions

    commit, dirty = git_state(str(root))
    return {
        "command": [Path(sys.executable).name, *sys.argv],
        "commit": commit,
        "dirty": dirty,
        "versions": versions(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine(**extra: Any) -> dict[str, Any]:
    """CPU model and count, load, torch threading, and `provenance()` (command, commit, versions);
    `extra` adds a script's own versions (ray, pyarrow...)."""
    info: dict[str, Any] = {
        **provenance(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return {**info, **extra}
