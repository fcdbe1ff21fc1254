"""How many trials run at once: `plan_concurrency` (pure) and the autoscaler config it sizes from.

The config files here are written the way `ray up` leaves `~/ray_bootstrap_config.yaml` on the head
(provider, head_node_type, available_node_types with resources and max_workers, global max_workers)
and read by Ray's own autoscaler config reader; no cluster is started.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from search.concurrency import (
    autoscaler_config_max_resources,
    cluster_max_resources,
    plan_concurrency,
    trial_resources,
)
from search.errors import UserError
from search.options import SearchOptions

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"

# docs/cluster.md's trial: 5 folds x (1 CPU, 0.2 GPU) plus the trial's own 0.1 CPU.
GPU_TRIAL = (5.1, 1.0)
# What cluster.yaml can grow to: a 0-CPU head, 4 + 2 GPU nodes of 8 CPUs and 1 GPU.
AWS_MAX = {"CPU": 48, "GPU": 6}
HEAD_ONLY: dict[str, float] = {"memory": 16e9, "object_store_memory": 4e9}  # Ray omits 0 CPUs


def write_config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---- plan_concurrency ------------------------------------------------------------------------


def test_trial_resources_of_the_documented_gpu_trial() -> None:
    opts = SearchOptions(folds=(1, 2, 3, 4, 5), cpus_per_fold=1.0, gpus_per_fold=0.2)
    assert trial_resources(opts) == pytest.approx(GPU_TRIAL)


@pytest.mark.parametrize(
    ("now", "per_trial", "trials", "expected"),
    [
        ({"CPU": 4}, (2.6, 0.0), 20, 1),  # 2 folds x 1.25 CPUs + 0.1 on a 4-CPU box
        ({"CPU": 16}, (1.1, 0.0), 20, 14),
        ({"CPU": 16}, (1.1, 0.0), 4, 4),  # never more than the trials
        ({"CPU": 5.1, "GPU": 1}, GPU_TRIAL, 20, 1),  # exactly one fits (no float round-down)
        ({"CPU": 64, "GPU": 2}, GPU_TRIAL, 20, 2),  # GPUs bound it
    ],
)
def test_a_fixed_cluster_runs_what_fits_now(
    now: dict[str, float], per_trial: tuple[float, float], trials: int, expected: int
) -> None:
    for connected in (False, True):
        assert plan_concurrency(now, None, per_trial, trials, None, connected) == (expected, None)


def test_an_empty_autoscaling_cluster_is_sized_by_its_autoscaler() -> None:
    n, message = plan_concurrency(HEAD_ONLY, AWS_MAX, GPU_TRIAL, 64, None, True)
    assert n == 6
    assert message == (
        "esc50 search: the autoscaler can grow to 48 CPUs / 6 GPUs: 6 trials at once; "
        "trials wait while it adds nodes"
    )


def test_fractional_gpus_fit_more_trials_into_the_maximum() -> None:
    # 5 folds x (0.5 CPU, 0.1 GPU): 2.6 CPUs, 0.5 GPUs -> 18 by CPUs, 12 by GPUs.
    assert plan_concurrency(HEAD_ONLY, AWS_MAX, (2.6, 0.5), 64, None, True)[0] == 12


def test_autoscaler_room_is_capped_by_trials() -> None:
    n, message = plan_concurrency(HEAD_ONLY, AWS_MAX, GPU_TRIAL, 4, None, True)
    assert n == 4
    assert "4 trials at once (room for 6; --trials 4)" in message


def test_explicit_concurrency_wins_and_is_reported_against_the_room() -> None:
    n, message = plan_concurrency(HEAD_ONLY, AWS_MAX, GPU_TRIAL, 64, 10, True)
    assert n == 10
    assert "10 trials at once (room for 6; --concurrency)" in message
    assert plan_concurrency({"CPU": 16}, None, (1.1, 0.0), 20, 3, False) == (3, None)


def test_nodes_beyond_the_config_count_too() -> None:
    # A node joined by hand (`ray start --address`) is outside the autoscaler's maximum.
    assert plan_concurrency({"CPU": 64, "GPU": 8}, AWS_MAX, GPU_TRIAL, 64, None, True)[0] == 8


def test_no_room_and_no_autoscaler_config_keeps_the_fallback() -> None:
    n, message = plan_concurrency(HEAD_ONLY, None, GPU_TRIAL, 64, None, True)
    assert n == 1
    assert message == (
        "esc50 search: the cluster has no room for a trial yet (0 CPUs, 0 GPUs); trials wait for the autoscaler"
    )
    assert plan_concurrency(HEAD_ONLY, None, GPU_TRIAL, 64, 3, True)[0] == 3


def test_a_trial_that_never_fits_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"one trial needs 5.1 CPUs and 1 GPUs .* has 4 CPUs, 0 GPUs$"):
        plan_concurrency({"CPU": 4}, None, GPU_TRIAL, 20, None, False)
    # Also with --concurrency: the search would wait forever.
    with pytest.raises(UserError, match=r"has 4 CPUs, 1 GPUs even at its largest$"):
        plan_concurrency(HEAD_ONLY, {"CPU": 4, "GPU": 1}, GPU_TRIAL, 20, 2, True)


# ---- the autoscaler config ---------------------------------------------------------------------


def test_max_resources_of_a_cluster_launcher_config(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        cluster_name: esc50-search
        max_workers: 6
        provider: {type: aws, region: us-west-2}
        head_node_type: head
        available_node_types:
          head:
            resources: {CPU: 0}
            max_workers: 0
            node_config: {InstanceType: m5.xlarge}
          gpu_t4:
            min_workers: 0
            max_workers: 4
            resources: {CPU: 8, GPU: 1}
            node_config: {InstanceType: g4dn.2xlarge}
          gpu_a10g:
            min_workers: 0
            max_workers: 2
            resources: {CPU: 8, GPU: 1}
            node_config: {InstanceType: g5.2xlarge}
        """,
    )
    assert autoscaler_config_max_resources(path) == AWS_MAX


def test_global_max_workers_caps_the_types_and_the_largest_nodes_count_first(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        cluster_name: t
        max_workers: 3
        provider: {type: aws, region: us-west-2}
        head_node_type: head
        available_node_types:
          head: {resources: {CPU: 2}, max_workers: 0, node_config: {}}
          small: {min_workers: 0, max_workers: 3, resources: {CPU: 4}, node_config: {}}
          big: {min_workers: 0, max_workers: 2, resources: {CPU: 16, GPU: 2}, node_config: {}}
        """,
    )
    # 3 workers at most: CPUs from 2 big + 1 small, GPUs from the 2 big; plus the head's CPUs.
    assert autoscaler_config_max_resources(path) == {"CPU": 2 + 2 * 16 + 4, "GPU": 2 * 2}


def test_a_type_without_max_workers_gets_the_global_one(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        cluster_name: t
        max_workers: 5
        provider: {type: aws, region: us-west-2}
        head_node_type: head
        available_node_types:
          head: {resources: {CPU: 0}, node_config: {}}
          cpu: {resources: {CPU: 2}, node_config: {}}
        """,
    )
    assert autoscaler_config_max_resources(path) == {"CPU": 10}


def test_no_or_no_autoscaler_config_gives_none(tmp_path: Path) -> None:
    assert autoscaler_config_max_resources(str(tmp_path / "missing.yaml")) is None
    assert autoscaler_config_max_resources(write_config(tmp_path, "just: [some, yaml]\n")) is None
    assert autoscaler_config_max_resources(write_config(tmp_path, "{not yaml\n")) is None


def test_the_repository_cluster_yaml() -> None:
    # `ray up` copies a prepared version of it to the head; the raw file reads the same. If you
    # changed max_workers or the instance types (its CHANGE comments), update AWS_MAX.
    most = autoscaler_config_max_resources(str(CLUSTER_YAML))
    assert most == AWS_MAX
    # docs/cluster.md: "--gpus-per-fold 0.2 --cpus-per-fold 1": 6 GPU nodes x 1 trial.
    assert plan_concurrency(HEAD_ONLY, most, GPU_TRIAL, 64, None, True)[0] == 6


@pytest.mark.ray
def test_a_local_ray_has_no_autoscaler_maximum_but_a_config_file_gives_one(
    ray_session: None, tmp_path: Path
) -> None:
    assert cluster_max_resources(str(tmp_path / "missing.yaml")) is None
    path = write_config(
        tmp_path,
        """
        cluster_name: t
        max_workers: 2
        provider: {type: aws, region: us-west-2}
        head_node_type: head
        available_node_types:
          head: {resources: {CPU: 0}, node_config: {}}
          gpu: {max_workers: 2, resources: {CPU: 8, GPU: 1}, node_config: {}}
        """,
    )
    assert cluster_max_resources(path) == {"CPU": 16, "GPU": 2}
