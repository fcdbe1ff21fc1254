"""A real two-node Ray cluster on this machine (tests/netns_cluster.py): placement, token auth,
a search over both nodes, a worker node lost mid-search, and a teardown that leaves nothing.

Root only (`ip netns`); skipped with the reason elsewhere. Nothing here connects the pytest
process to these clusters: every driver is a subprocess inside the namespace, so the shared
`ray_session` fixture of other tests is untouched.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns_cluster import GIB, MIB, NetnsCluster, cmdline, unavailable_reason

pytestmark = pytest.mark.multinode

NODE_CPUS = 2
NODE_MEMORY = 2 * GIB
NODE_OBJECT_STORE = 200 * MIB


def _skip_unless_possible() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-node cluster not possible here: {reason}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    """Head + one worker for the whole module; torn down (and checked) even when a test fails."""
    _skip_unless_possible()
    c = NetnsCluster(num_cpus=NODE_CPUS, memory=NODE_MEMORY, object_store_memory=NODE_OBJECT_STORE)
    try:
        c.start(workers=1)
        yield c
    finally:
        survivors = c.close()
    assert not survivors, f"Ray processes left behind: {survivors}"


# ---- the cluster itself ------------------------------------------------------------------------


def test_two_nodes_with_the_resources_given_and_token_auth(cluster: NetnsCluster) -> None:
    table = cluster.node_table()
    assert len(table) == 2 and all(n["alive"] for n in table)
    assert {n["port"] for n in table} == {n.node_manager_port for n in cluster.nodes}

    res = cluster.python("result(gcs().cluster_resources())")
    assert res["CPU"] == 2 * NODE_CPUS
    assert res["memory"] == 2 * NODE_MEMORY
    assert res["object_store_memory"] == 2 * NODE_OBJECT_STORE
    assert "GPU" not in res

    # The GCS refuses a client without the cluster's token (fast: no driver retries).
    probe = (
        "from ray._raylet import GcsClient\n"
        f"try:\n    GcsClient(address={cluster.address!r}).internal_kv_keys(b'', None, timeout=10)\n"
        "    result('accepted')\n"
        "except Exception as e:\n    result(type(e).__name__ + ': ' + str(e)[:200])\n"
    )
    assert cluster.python(probe) == "accepted"
    refused = cluster.python(probe, env={"RAY_AUTH_TOKEN": "0" * 64})  # the highest-precedence source
    assert refused.startswith("AuthenticationError") and "token" in refused, refused


PLACEMENT = """
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
connect()

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

out = {}
for strategy, n in [("PACK", 2), ("PACK", 3), ("STRICT_SPREAD", 2)]:
    pg = placement_group([{"CPU": 1}] * n, strategy=strategy)
    ray.get(pg.ready(), timeout=60)
    s = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i) for i in range(n)]
    out[f"{strategy}x{n}"] = ray.get([where.options(scheduling_strategy=x).remote() for x in s])
    remove_placement_group(pg)
result(out)
"""


def test_placement_packs_when_it_fits_and_spreads_otherwise(cluster: NetnsCluster) -> None:
    """The strategy folds use (docs/cluster.md): PACK = one node if the bundles fit, else several."""
    nodes = {n["id"] for n in cluster.node_table() if n["alive"]}
    got = cluster.python(PLACEMENT, timeout=120)
    assert len(set(got["PACKx2"])) == 1  # 2 x 1 CPU fit on one 2-CPU node
    assert set(got["PACKx3"]) == nodes  # 3 x 1 CPU do not: spread over both
    assert set(got["STRICT_SPREADx2"]) == nodes


# ---- the search on the cluster -----------------------------------------------------------------


ACTORS = """
result([{"cls": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
        for a in gcs().actor_table(None).values()])
"""


def _fold_worker_nodes(cluster: NetnsCluster) -> dict[str, int]:
    """Node id -> how many fold workers ran there (the GCS keeps finished actors)."""
    counts: dict[str, int] = {}
    for a in cluster.python(ACTORS):
        if a["cls"] == "FoldWorker":
            counts[a["node"]] = counts.get(a["node"], 0) + 1
    return counts


def _trial_epochs(storage: Path, name: str) -> dict[str, list[int]]:
    """Trial dir -> the `epoch` of every result Tune recorded for it, in order."""
    out = {}
    for d in sorted((storage / name).iterdir()):
        if (d / "result.json").exists():
            lines = (d / "result.json").read_text().splitlines()
            out[d.name] = [json.loads(line)["epoch"] for line in lines if line.strip()]
    return out


def _checkpoint_nodes(storage: Path, name: str) -> dict[str, set[str]]:
    """Trial dir -> the nodes its folds ran on, from the `nodes` of its latest checkpoint's meta."""
    out = {}
    for meta in sorted((storage / name).glob("*/checkpoint_*/meta.json")):
        try:  # while a search runs, Tune deletes older checkpoints (num_to_keep)
            out[meta.parent.parent.name] = set(json.loads(meta.read_text())["nodes"].values())
        except (OSError, ValueError):
            continue
    return out


ESC50 = Path(sys.executable).parent / "esc50"


def _search(cluster: NetnsCluster, shards: str, name: str, *extra: str) -> list[str]:
    return [
        ESC50, "search", "--smoke",
        "--address", cluster.address,
        "--storage", f"file://{cluster.storage}",
        "--shards", shards,
        "--tracking-uri", f"sqlite:///{cluster.root / 'mlflow.db'}",
        "--name", name,
        *extra,
    ]  # fmt: skip


# A smoke search of its own (folds on both nodes, each checkpoint naming its folds' nodes) was
# merged into the node-loss search below, which asserts the same of its own search: one search
# end to end on the cluster instead of two.


def test_search_over_both_nodes_survives_losing_a_worker_node(
    cluster: NetnsCluster, tiny_shards: str
) -> None:
    """A search runs its folds on both nodes; then the worker node dies mid-search (its raylet is
    killed) and a new node joins; every trial ends with all its epochs, and the trial that was on
    the lost node resumed from its checkpoint."""
    worker = cluster.nodes[-1]
    lost = cluster.node_id(worker)
    head = cluster.node_id(cluster.nodes[0])
    before = _fold_worker_nodes(cluster)
    epochs = 60  # ~0.1 s each here: a window of seconds to kill the node in
    t0 = time.monotonic()
    log = cluster.root / "node_loss_search.log"
    proc = cluster.popen(
        _search(
            cluster, tiny_shards, "mn_loss",
            "--trials", "2", "--folds", "1,2", "--epochs", str(epochs), "--no-asha",
        ),
        log=log,
    )  # fmt: skip
    try:
        # Wait until a trial on the worker node has a checkpoint and its folds are training.
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, f"search ended before the node was lost:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no trial ever trained on the worker node"
            on_worker = [
                t for t, nodes in _checkpoint_nodes(cluster.storage, "mn_loss").items() if lost in nodes
            ]
            if on_worker and any("FoldWorker.run_epoch" in c for c in cluster.children(worker)):
                break
            time.sleep(0.2)
        t_kill = time.monotonic() - t0
        cluster.kill_node(worker)
        cluster.add_worker()  # returns once the GCS counts the lost node dead and the new one alive
        t_new = time.monotonic() - t0
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-6000:]
    trials = _trial_epochs(cluster.storage, "mn_loss")
    assert len(trials) == 2
    for trial, seen in trials.items():
        assert sorted(set(seen)) == list(range(1, epochs + 1)), (trial, seen)
        # A retry goes on from the trial's checkpoint: it may redo the epoch the node died in
        # (reported, not yet checkpointed), never the whole trial from epoch 1.
        restarts = [b for a, b in zip(seen, seen[1:], strict=False) if b <= a]
        assert all(epoch > 1 for epoch in restarts), (trial, seen)
    assert _failures(cluster.storage, "mn_loss") >= 1, "Tune recorded no failure: the node was lost too late"
    final = _checkpoint_nodes(cluster.storage, "mn_loss")
    assert lost not in final[on_worker[0]], "the retried trial did not move off the lost node"
    # Its folds ran on both first nodes (the GCS's actor table keeps finished and dead actors), and
    # the trainable's own record agrees: each checkpoint names nodes its folds ran on.
    after = _fold_worker_nodes(cluster)
    ran = {n for n in after if after[n] > before.get(n, 0)}
    assert {head, lost} <= ran, f"fold workers per node: {after}, before the search {before}"
    assert set().union(*final.values()) <= ran, (final, ran)
    print(
        f"node lost at {t_kill:.1f}s, new node at {t_new:.1f}s, search done at {time.monotonic() - t0:.1f}s"
    )


def _failures(storage: Path, name: str) -> int:
    """Trial failures Tune recorded in its experiment state (each one was retried)."""
    totals = [0]
    for state in (storage / name).glob("experiment_state-*.json"):
        trials = json.loads(state.read_text())["trial_data"]  # [trial json, run metadata json]
        totals.append(sum(json.loads(meta)["num_failures"] for _, meta in trials))
    return max(totals)


# ---- teardown: last, it closes the module's cluster ----------------------------------------


def test_teardown_leaves_no_ray_process(cluster: NetnsCluster) -> None:
    """After the searches above (daemons, agents, idle and finished workers on three nodes, one of
    them killed), closing the cluster leaves no process, no namespace and no files behind."""
    raylets = [n.raylet_pid() for n in cluster.nodes]
    assert sum(pid is not None for pid in raylets) >= 2
    seen = cluster.snapshot()
    assert any("gcs_server" in cmdline(p) for p in seen)
    assert any(cmdline(p).startswith("ray::") for p in seen)  # agents and workers, not only daemons
    assert cluster.close() == []
    assert cluster.alive(seen) == [], "a process of the cluster is still running"
    assert not cluster.namespace_exists()
    assert not cluster.root.exists()
