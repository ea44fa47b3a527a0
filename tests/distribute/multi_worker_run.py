"""One worker of a two-worker server (MultiWorkerMirroredStrategy) on this
machine, for tests/distribute/test_multi_worker.py:

  python -m tests.distribute.multi_worker_run INDEX PORT0,PORT1 DATA.npz OUT.npz

Both workers run the same in-process round robin (the same clients, the same
batches); the server's batches are split across the two workers. Writes the
final server and client weights to OUT.npz.
"""

import json
import os
import sys


def main(index, ports, data, out):
    workers = [f"localhost:{p}" for p in ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    import numpy as np

    from splitkeras import distribute
    from tests.distribute.test_mirrored_server import _in_process
    from tests.distributed.runs import setup as _setup

    config, _ = _setup(data, **{"train.epochs": 1, "train.learning_rate": 0.01})
    strategy = distribute.make_strategy({"strategy": "multi_worker"})
    server, client, test = _in_process(config, strategy)
    weights = {f"server_{i}": w for i, w in enumerate(server.segment.get_weights())} | {
        f"client_{i}": w for i, w in enumerate(client.segment.get_weights())
    }
    np.savez(
        out,
        replicas=strategy.num_replicas_in_sync,
        accuracy=test["accuracy"],
        **weights,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:5])
