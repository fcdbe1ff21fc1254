"""The Ray a search runs on: the cluster at --address (connect only), else a local Ray on loopback
with at least the CPUs the search's concurrency needs; and how many trials run on it at once."""

from __future__ import annotations

import math
import os

from search.concurrency import default_concurrency, trial_resources
from search.errors import UserError
from search.options import SearchOptions
from trainable.errors import error_line

# The standard AWS variables that say where object storage is and who we are there. Trials read and
# write their checkpoints in --storage from their own processes, which on a running cluster do not
# inherit the driver's environment; these go to them with the job (Ray keeps a job's runtime_env
# in its GCS, behind the cluster's token). On AWS with instance profiles none of them is set.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def storage_env() -> dict[str, str]:
    """The STORAGE_ENV variables this process has, for the trials' runtime_env."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def start_ray(opts: SearchOptions) -> bool:
    """Ray for the search, and `opts.concurrency` settled on it (--concurrency checked to fit, else
    as many trials as fit). Returns whether this call started Ray (the caller shuts it down)."""
    import ray

    started = _start(opts)
    try:
        if opts.concurrency is None:
            opts.concurrency = default_concurrency(opts)
        else:
            default_concurrency(opts)  # checks that one trial fits at all
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


def _start(opts: SearchOptions) -> bool:
    """Connect to --address, or start a local Ray on loopback. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": storage_env()} if storage_env() else None
    if opts.address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        try:
            ray.init(
                address=opts.address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False
            )
        except Exception as e:
            raise UserError(f"--address {opts.address}: cannot connect to Ray: {error_line(e)}") from None
        return True
    # Local Ray on loopback only: Ray reads this switch when it is imported, so set the constant too.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    cpus, _ = trial_resources(opts)
    need = math.ceil(cpus * (opts.concurrency or 1))
    ray.init(
        num_cpus=max(os.cpu_count() or 1, need),
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=False,
        configure_logging=False,
        # Ray runs workers at nice 15 by default; the trials are this job's main work, and on a CPU
        # shared with anything else they would crawl.
        _system_config={"worker_niceness": 0},
    )
    return True
