"""Runs one job on a multi-node ``ray.cluster_utils.Cluster`` in its own process (a test helper,
not a test): ``python -m tests.cluster_driver INPUT OUTPUT MODEL NUM_FRAMES SIZE MODE``.

MODE ``remove-node``: three nodes; the worker node hosting the encoder actor is removed while
clips are being decoded and encoded. MODE ``spill``: one node with a small object store, fed more frame
data than it holds. Prints the run's summary as JSON on its last line.
"""
import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from pipeline import run as run_mod
from pipeline.config import Config, validate

MIB = 1 << 20


def _actor_node(cluster_nodes):
    """The worker node running the encoder actor (asked of the GCS: no dashboard needed)."""
    from ray._private import state

    for actor in state.actors().values():
        if "VAEEncoder" in actor.get("ActorClassName", "") and actor.get("State") == "ALIVE":
            for node in cluster_nodes:
                if node.node_id == actor["Address"]["NodeID"]:
                    return node
    return None


def main(input_, output, model, num_frames, size, mode):
    if mode == "remove-node":
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # work on workers only
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    else:
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 2, "object_store_memory": 80 * MIB})
        workers = []
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg, info = validate(Config(input=input_, output=output, model=model, num_frames=int(num_frames),
                                height=int(size), width=int(size)))
    removed = {}

    def remove_when_encoding():
        """Once the actor runs on a worker and clips flow, take that node away."""
        markers = os.path.join(output, "_markers")
        node = None
        while node is None or not (os.path.isdir(markers) and os.listdir(markers)):
            time.sleep(0.1)
            node = node or _actor_node(workers)
        removed["node"] = node.node_id
        cluster.remove_node(node)

    if workers:
        threading.Thread(target=remove_when_encoding, daemon=True).start()
    summary = run_mod.run(cfg, info)
    summary["removed_node"] = removed.get("node")
    print(json.dumps(summary), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
