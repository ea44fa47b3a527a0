"""What the process tests share: tiny data, configs, and the same run in one
process to compare the processes' final weights with."""

import json
import os

import numpy as np

from splitkeras import builders, client_data, learning_rate
from splitkeras.cli import set_fields
from splitkeras.configs import fashion_mnist_lenet
from splitkeras.cut import cut
from splitkeras.experiment import InProcess
from splitkeras.privacy.leakage import attach_privacy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_npz(path, n_train, n_test=64):
    """Three easy classes of 28x28 images (brightness), as a Keras .npz."""
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, n_train), rng.integers(0, 3, n_test)

    def images(labels):
        x = (
            rng.integers(0, 90, (len(labels), 28, 28, 1))
            + 80 * labels[:, None, None, None]
        )
        return x.astype(np.uint8)

    np.savez(
        path,
        x_train=images(y_train),
        y_train=y_train,
        x_test=images(y_test),
        y_test=y_test,
    )
    return path


def setup(data_path, **overrides):
    """(config, command-line config args) with the same overrides."""
    c = fashion_mnist_lenet.get_config()
    settings = {
        "data.path": data_path,
        "num_clients": 2,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.eval_batch_size": 64,
        "train.learning_rate": 0.01,
        "data.num_classes": 3,  # for the hosts, which do not read the data
        **overrides,
    }
    return c, ["--config=fashion_mnist_lenet", *set_fields(c, settings)]


def in_process(config, train=True):
    """The config's schedule in one process, trained as `splitkeras train`
    trains it (or untrained, to load weights into)."""
    data = client_data.shared_data(config)
    schedule = builders.build_schedule(config, data)
    attach_privacy(schedule, config)
    if train:
        process = InProcess(config, schedule, data)
        schedule.run_steps = 0  # as the run's summary counts them
        for epoch in range(config.train.epochs):
            learning_rate.start_epoch(config.train, schedule.optimizers, epoch)
            schedule.run_steps += sum(1 for _ in process.round(epoch))
    return schedule


def leakage_of(config, trained, untrained=None):
    """(the leakage figures of the `trained` schedule as the run in one
    process logs them after its last round, that run's `Leakage`: its start
    figures measured on `untrained`, default `trained`). It measures once per
    round, as the run does, so that the server's Marvell-style noise in the
    last figures is the run's last draw. With activation noise on, this
    fresh `Leakage` would draw other noise than the run's."""
    if config.privacy.activation_noise:
        raise ValueError("leakage_of measures without activation noise only")
    first = trained if untrained is None else untrained
    leakage = InProcess(config, first, builders.load_data(config)).leakage
    for _ in range(int(config.train.epochs) - 1):
        leakage(trained)
    return leakage(trained), leakage


def parties(config, schedule) -> dict:
    """{file stem in the processes' workdirs: the schedule's model}."""
    method, topology = config.method, config.topology
    k_all = range(config.num_clients)
    if method == "fedavg":
        out = {"server/server": schedule.global_model}
        out.update(
            {f"client_{k}/model": p.model for k, p in enumerate(schedule.programs)}
        )
        return out
    if method == "large_batch_sgd":
        out = {"server/server": schedule.model}
        out.update(
            {f"client_{k}/model": p.model for k, p in enumerate(schedule.programs)}
        )
        return out
    if topology == "multihop":
        return {
            "server/server": schedule.server.segment,
            "relay/relay": schedule.relays[0].segment,
            "client_0/client": schedule.client.segment,
        }
    if topology == "multitask":
        out = {f"head_{i}/head_{i}": h.segment for i, h in enumerate(schedule.heads)}
        out["client_0/client"] = schedule.client.segment
        return out
    if method.startswith("splitfed"):
        servers = schedule.servers
        out = (
            {f"server/server_{i}": s.segment for i, s in enumerate(servers)}
            if len(servers) > 1
            else {"server/server": servers[0].segment}
        )
    else:
        out = {"server/server": schedule.server.segment}
    for k in k_all:
        client = schedule.clients[k]
        out[f"client_{k}/client"] = client.segment
        if client.tail is not None:
            out[f"client_{k}/tail"] = client.tail
    return out


def processes_weights(config, workdir, untrained=None) -> dict:
    """The final weights the processes wrote, by the names of `parties`
    (loaded into `untrained`, a schedule of `config`, or one built now)."""
    fresh = parties(config, untrained or in_process(config, train=False))
    weights = {}
    for name, model in fresh.items():
        model.load_weights(os.path.join(workdir, f"{name}.weights.h5"))
        weights[name] = [w.copy() for w in model.get_weights()]
    return weights


def in_process_weights(config, schedule=None) -> dict:
    """The final weights of the same run in one process (of `schedule`, a
    trained one, if given)."""
    trained = parties(config, schedule or in_process(config))
    return {name: [w.copy() for w in m.get_weights()] for name, m in trained.items()}


def client_bytes(counts: dict) -> tuple:
    """([bytes sent per client], [received]) over every kind of traffic of
    a schedule's `byte_counts()`: steps, handoffs, averaging, alignment."""
    sent = [sum(v) for v in zip(*(c for n, c in counts.items() if _sent(n)))]
    received = [sum(v) for v in zip(*(c for n, c in counts.items() if not _sent(n)))]
    return sent, received


def _sent(name) -> bool:
    return name == "bytes_up" or name.endswith("_sent")


def processes_client_bytes(config, workdir) -> tuple:
    """([bytes sent per client], [received]) as each client process counted
    them at its gRPC connections (messages + gRPC framing)."""
    summaries = []
    for k in range(config.num_clients):
        with open(os.path.join(workdir, f"client_{k}", "summary.json")) as f:
            summaries.append(json.load(f))
    return [s["bytes_sent"] for s in summaries], [
        s["bytes_received"] for s in summaries
    ]


def loaded_segments(config, workdir, last_client):
    """The server segment and client `last_client`'s segments the processes
    wrote, loaded into fresh copies."""
    segments = cut(
        builders.build_model(config, builders.load_data(config)),
        builders.cut_layers(config),
    )
    segments.server.load_weights(os.path.join(workdir, "server", "server.weights.h5"))
    client_dir = os.path.join(workdir, f"client_{last_client}")
    segments.client.load_weights(os.path.join(client_dir, "client.weights.h5"))
    if segments.tail is not None:
        segments.tail.load_weights(os.path.join(client_dir, "tail.weights.h5"))
    return segments


def assert_same_weights(test, processes: dict, expected: dict) -> None:
    """The same parties, and each party's weights equal to the bit: every
    process compiles its part of a step as the one-process run compiles the
    fused step (a relay's and a U-shaped server's step included), so the
    float32 results are the same."""
    test.assertEqual(sorted(processes), sorted(expected))
    for name in expected:
        with test.subTest(party=name):
            test.assertWeightsClose(processes[name], expected[name], atol=0.0)


def thread_host(test, config, hijack_inputs=None, **options):
    """The config's "server" host served from this process on 127.0.0.1
    (stopped when `test` ends): (hosted parties, coordinator, the
    `GrpcHost`, {hosted party: address}); `options` go to `GrpcHost`;
    `hijack_inputs`: a hijacking host's public inputs."""
    import time

    from splitkeras import deployment
    from splitkeras.transport.grpc_host import GrpcHost, start_host

    parties, coordinator, state = deployment.hosted_parties(
        config, "server", {}, None, clock=time.monotonic, hijack_inputs=hijack_inputs
    )
    info = {
        "schedule": deployment.schedule_name(config),
        "epochs": int(config.train.epochs),
    }
    host = GrpcHost(
        parties,
        int(config.num_clients),
        state=state,
        coordinator=coordinator,
        info=info,
        **options,
    )
    server, port = start_host(host, "127.0.0.1:0")
    test.addCleanup(lambda: (host.closed.set(), server.stop(grace=None).wait()))
    return parties, coordinator, host, {name: f"127.0.0.1:{port}" for name in parties}
