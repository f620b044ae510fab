"""Runs one job on a multi-node ``ray.cluster_utils.Cluster`` in its own process (a test helper,
not a test): ``python -m tests.cluster_driver INPUT OUTPUT MODEL NUM_FRAMES SIZE MODE``.

MODE ``remove-node``: three nodes; the worker node hosting the encoder actor is removed while the
actor's first call is under way (it blocks at the ``encode`` hook until its node is gone: the
fault lands because the pipeline got there, not because a timer fired). MODE ``spill``: one node
with a small object store, fed more frame data than it holds. Prints the run's summary as JSON
on its last line. The hooks' folder comes from VIDEO_LATENTS_TEST_HOOKS, set by the test.
"""
import json
import os
import sys
import threading

import ray
from ray.cluster_utils import Cluster

from pipeline import run as run_mod
from pipeline.config import Config, validate
from pipeline.hooks import ENV
from tests.hookctl import Hooks

MIB = 1 << 20


def main(input_, output, model, num_frames, size, mode):
    if mode == "remove-node":
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # work on workers only
        # Two CPUs a node: the one left after the removal must fit the restarted actor and decoding.
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    else:
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 2, "object_store_memory": 80 * MIB})
        workers = []
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg, info = validate(Config(input=input_, output=output, model=model, num_frames=int(num_frames),
                                height=int(size), width=int(size)))
    removed = {}

    def remove_when_encoding(hooks: Hooks):
        """When the first encoder call signals from its node, take that node away."""
        _, _, _, node_id = hooks.wait("encode")["encode"]
        node = next(n for n in workers if n.node_id == node_id)
        removed["node"] = node_id
        cluster.remove_node(node)

    if workers:
        hooks = Hooks(os.environ[ENV])
        hooks.arm("encode", "block", first=1, last=1)
        threading.Thread(target=remove_when_encoding, args=(hooks,), daemon=True).start()
    summary = run_mod.run(cfg, info)
    summary["removed_node"] = removed.get("node")
    print(json.dumps(summary), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
