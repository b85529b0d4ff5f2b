"""How long the head takes to declare a SIGKILLed node dead, with Ray's health-check defaults
and with the settings deploy/ gives its clusters (deploy/Dockerfile, deploy/local-cluster.sh).

    python bench/node_loss.py            # both, one after the other (about 1 minute)

A two-node cluster on this machine (ray.cluster_utils.Cluster), an actor on the worker node,
then the node's raylet SIGKILLed with its processes: the time until `ray.nodes()` says the
node is dead and until a call to the actor fails. Until then Ray Train waits on a rank of
that node, so this is where a node loss's recovery starts. The settings reach the head the
way deploy/ sets them: as RAY_health_check_* variables in the nodes' environment.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any
from unittest import mock

FAST = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def measure(env: dict[str, str]) -> dict[str, Any]:
    # The nodes Cluster starts inherit this environment: only `env`'s health-check settings.
    with mock.patch.dict(os.environ, env):
        for k in [k for k in os.environ if k.startswith("RAY_health_check_") and k not in env]:
            del os.environ[k]
        return _measure()


def _measure() -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        node = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()

        @ray.remote(num_cpus=1)
        class Where:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        on_node = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
        actor = Where.options(scheduling_strategy=on_node).remote()
        assert ray.get(actor.node.remote()) == node.node_id
        time.sleep(6)  # past the health checks' initial delay
        t0 = time.time()
        cluster.remove_node(node, allow_graceful=False)
        node_dead = actor_dead = None
        while (node_dead is None or actor_dead is None) and time.time() - t0 < 120:
            if node_dead is None and any(n["NodeID"] == node.node_id and not n["Alive"] for n in ray.nodes()):
                node_dead = time.time() - t0
            if actor_dead is None:
                try:
                    ray.get(actor.node.remote(), timeout=0.5)
                except ray.exceptions.RayActorError:
                    actor_dead = time.time() - t0
                except ray.exceptions.GetTimeoutError:
                    pass
            time.sleep(0.05)
        return {"node_dead_s": node_dead, "actor_call_fails_s": actor_dead}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    out = {}
    for name, env in (("ray_defaults", {}), ("deploy", FAST)):
        out[name] = {"env": env, **measure(env)}
        print(
            f"{name}: node dead after {out[name]['node_dead_s']:.1f} s, a call to its actor fails "
            f"after {out[name]['actor_call_fails_s']:.1f} s",
            flush=True,
        )
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
