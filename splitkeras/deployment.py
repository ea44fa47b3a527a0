"""Which process holds which party of a config, and how each builds its own.

A run over gRPC is one or more hosts (processes that answer messages) and
K client processes. `layout(config)` says, for the config's schedule, which
hosts there are, which parties each serves and which parties each client
talks to:

- round robin, U-shaped: host "server"; a client talks to the server
  (and, with the peer handoff, to the next client's inbox).
- SplitFed v1 / v2: host "server" (with the fed server, or "fed" apart);
  a client talks to server and fed.
- vertical: host "server" (server, aligner); a client talks to both.
- multi-hop: hosts "server" and "relay" (each its own process); the
  client talks to the relay.
- multi-task: hosts head_0, head_1, ... (each its own); the client talks
  to every head.
- FedAvg, large-batch SGD: host "server".

`hosted_parties` builds a host's parties from the config alone (no dataset:
shapes from `builders.data_spec`); `client_program` builds client k's
program. Both build exactly what the in-process schedule builds for that
party (the same seeded model, cut, optimizer, objective), so a run across
processes equals the in-process run.
"""

from __future__ import annotations

import dataclasses
import logging

import tensorflow as tf

from splitkeras import builders
from splitkeras.checkpointing import party_checkpoint
from splitkeras.cut import cut
from splitkeras.objective import metric_names
from splitkeras.parties import Client, Server
from splitkeras.parties.averager import Averager, weight_specs
from splitkeras.parties.relay import Relay
from splitkeras.parties.segment_step import specs_of, wire_dtype
from splitkeras.parties.splitfed_servers import OrderedServer, ServerCopies
from splitkeras.parties.vertical_server import VerticalServer, label_protection
from splitkeras.privacy.attacks.hijacking import FeatureSpaceHijacker, HijackingServer
from splitkeras.privacy.defenses import from_config
from splitkeras.privacy.leakage import EvaluationLeak
from splitkeras.schedules import pipelining
from splitkeras.schedules.alignment import Aligner
from splitkeras.schedules.coordinator import Rounds
from splitkeras.schedules.fedavg import FedAvgClient
from splitkeras.schedules.large_batch_sgd import GradientServer, SGDClient
from splitkeras.schedules.multihop import hop_segments
from splitkeras.schedules.multitask import TaskClient, task_heads
from splitkeras.schedules.round_client import RoundClient
from splitkeras.schedules.round_robin import KerasTurns, server_party
from splitkeras.schedules.splitfed import FedClient, segment_weights
from splitkeras.schedules.turn_coordinator import Turns

__all__ = [
    "FINGERPRINT_FIELDS",
    "Layout",
    "client_program",
    "config_fingerprint",
    "hosted_parties",
    "layout",
    "schedule_name",
]

# What every process of a run must agree on: a client built from other
# values trains silently against a server that computes something else.
FINGERPRINT_FIELDS = (
    "seed",
    "num_clients",
    "method",
    "topology",
    "weight_handoff",
    "model.name",
    "model.cut",
    "train.epochs",
    "train.batch_size",
    "train.optimizer",
    "train.learning_rate",
    "train.weight_decay",
    "train.lr_schedule",
    "train.mixed_precision",
    "train.microbatches",
    "train.max_staleness",
)


@dataclasses.dataclass
class Layout:
    """Where the parties of a run live.

    Attributes:
      hosts: {host name: [parties it serves]}, in start order (a host may
        need the hosts before it, e.g. a relay the server).
      host_links: {host name: [parties on other hosts it sends to]}.
      client_links: the parties every client sends to.
      peers: clients hand their state to the next client directly (each
        client serves its own inbox, "client_k").
    """

    hosts: dict
    host_links: dict
    client_links: list
    peers: bool = False


def schedule_name(config) -> str:
    """One name for a config's schedule (hosts and clients compare it)."""
    if config.method != "split":
        return config.method
    return f"split/{config.topology}"


def check_over_grpc(config) -> None:
    """Refuses what a run over gRPC cannot do, before any process starts."""
    if config.train.get("max_steps", 0):
        raise ValueError(
            f"config.train.max_steps={config.train.max_steps} stops a run in one "
            "process (splitkeras train); over gRPC the hosts and clients train "
            "whole rounds: set config.train.epochs instead"
        )


def config_fingerprint(config) -> dict:
    """The values of `FINGERPRINT_FIELDS` in `config` (as strings)."""
    values = {}
    for field in FINGERPRINT_FIELDS:
        node = config
        for part in field.split("."):
            node = node.get(part, None) if hasattr(node, "get") else None
        values[field] = str(node)
    return values


def layout(config) -> Layout:
    """The hosts, their parties and every client's links for `config`."""
    builders.check_method(config)
    if config.method == "centralized":
        raise ValueError("centralized training has one party: run `splitkeras train`")
    if config.topology == "multihop":
        return Layout(
            {"server": ["server"], "relay": ["relay"]}, {"relay": ["server"]}, ["relay"]
        )
    if config.topology == "multitask":
        # config.multitask adds one head: the model's two tasks.
        heads = [f"head_{i}" for i in range(2)]
        return Layout({h: [h] for h in heads}, {}, heads)
    if config.topology == "vertical":
        return Layout({"server": ["server", "aligner"]}, {}, ["server", "aligner"])
    if config.method in ("splitfed_v1", "splitfed_v2"):
        if config.get("splitfed", {}).get("fed_process", False):
            # The fed host links to the server only to learn when the run is over.
            return Layout(
                {"server": ["server"], "fed": ["fed"]},
                {"fed": ["server"]},
                ["server", "fed"],
            )
        return Layout({"server": ["server", "fed"]}, {}, ["server", "fed"])
    peers = config.method == "split" and config.weight_handoff == "peer"
    return Layout({"server": ["server"]}, {}, ["server"], peers=peers)


# ------------------------------------------------------------------ hosts
def hosted_parties(
    config, host: str, links=None, strategy=None, clock=None, hijack_inputs=None
):
    """A host's parties, built from the config alone.

    Args:
      config: the run's config.
      host: the host's name in `layout(config).hosts`.
      links: {party: link} to the parties on other hosts it sends to.
      strategy: a `tf.distribute.Strategy` for the server (round robin).
      clock: the time source of turn timeouts.
      hijack_inputs: a red team's host: inputs as the input pipeline gives
        them (scaled floats) on which a `FeatureSpaceHijacker` trains,
        answering in the place of round robin's server (`HijackingServer`).
        None: the honest server.

    Returns:
      (parties {name: party}, coordinator or None, state {name: trackable}
      to commit).
    """
    names = layout(config).hosts[host]
    links = links or {}
    build = builders.model_builder(config)
    make_optimizer = lambda: builders.make_optimizer(config)  # noqa: E731
    k = config.num_clients
    epochs = int(config.train.epochs)
    if hijack_inputs is not None:
        _check_hijackable(config, strategy)
    if config.topology == "multihop":
        return _multihop_host(config, host, build, make_optimizer, links, epochs)
    if config.topology == "multitask":
        return _head(config, int(host.split("_")[1]), build, make_optimizer, epochs)
    if config.topology == "vertical":
        return _vertical_host(config, build, make_optimizer, epochs)
    if config.method in ("splitfed_v1", "splitfed_v2"):
        return _splitfed_host(config, names, build, make_optimizer, epochs)
    if config.method in ("fedavg", "large_batch_sgd"):
        model = build()
        if config.method == "fedavg":
            server = Averager(k, model.weights, config.fedavg.local_epochs)
            server.model = model  # the global model the average is
            state = {"model": party_checkpoint([model]), **server.trackables()}
        else:
            server = GradientServer(model, make_optimizer(), k)
            state = {
                "model": party_checkpoint([model], server.optimizer),
                **server.trackables(),
            }
        coordinator = Rounds(server, k, epochs, reports=True)
        return {"server": coordinator}, coordinator, _with(state, coordinator)
    # Round robin (vanilla or U-shaped).
    segments = cut(build(), builders.cut_layers(config))
    server = server_party(
        segments.server,
        make_optimizer,
        builders.make_loss(),
        metric_names(config),
        segments.ushaped,
        strategy,
    )
    server.build_optimizer()
    if hijack_inputs is not None:
        server = HijackingServer(
            server,
            FeatureSpaceHijacker(
                segments.client,
                hijack_inputs,
                server_segment=segments.server if segments.ushaped else None,
                batch_size=int(config.train.batch_size),
                seed=int(config.seed),
            ),
        )
    if pipelining(config)[0] > 1:
        # Micro-batches: the gradient sums exist before any step is compiled
        # (a compiled function creates variables only at its first trace).
        server.gradient_sums()
    coordinator = Turns(
        server,
        k,
        epochs,
        reports=True,
        store_state=config.weight_handoff == "server",
        turn_timeout=float(config.grpc.turn_timeout_seconds),
        clock=clock,
        ahead=pipelining(config)[1],
    )
    state = {"server": party_checkpoint([server.segment], server.optimizer)}
    return {"server": coordinator}, coordinator, _with(state, coordinator)


def _check_hijackable(config, strategy) -> None:
    """A hijacking host stands in for one round-robin server that takes
    whole batches."""
    if config.topology not in ("vanilla", "ushaped") or config.method != "split":
        raise ValueError(
            "a hijacking host stands in for round robin's server (method "
            f"'split', vanilla or U-shaped), not topology {config.topology!r} "
            f"with method {config.method!r}"
        )
    if strategy is not None:
        raise ValueError(
            "a hijacking host runs in one process: not with a tf.distribute "
            "strategy (config.server.strategy)"
        )
    if pipelining(config)[0] > 1:
        raise ValueError(
            "a hijacking host takes whole batches: not with "
            f"config.train.microbatches={pipelining(config)[0]}"
        )


def _with(state, coordinator) -> dict:
    return {**state, "coordinator": tf.train.Checkpoint(**coordinator.trackables())}


def _splitfed_host(config, names, build, make_optimizer, epochs):
    k = config.num_clients
    at = builders.cut_layers(config)
    parties, state, coordinator = {}, {}, None
    segments = [
        cut(build(), at) for _ in range(k if config.method == "splitfed_v1" else 1)
    ]
    if "server" in names:
        objective = None if segments[0].ushaped else builders.make_objective(config)
        servers = [Server(s.server, make_optimizer(), objective) for s in segments]
        for s in servers:
            s.build_optimizer()
        if config.method == "splitfed_v1":
            main = ServerCopies(servers)
            coordinator = Rounds(main, k, epochs, reports=True, on_trained=main.average)
        else:
            main = OrderedServer(servers[0], k)
            coordinator = Rounds(main, k, epochs, reports=True)
        parties["server"] = coordinator
        state.update({f"copy_{i}": s.checkpoint() for i, s in enumerate(servers)})
        state = _with(state, coordinator)
    if "fed" in names:
        uploads = segment_weights(segments[0].client, segments[0].tail)
        fed = Averager(k, weight_specs(uploads))
        parties["fed"] = fed
        state["fed"] = tf.train.Checkpoint(**fed.trackables())
    return parties, coordinator, state


def _vertical_host(config, build, make_optimizer, epochs):
    k = config.num_clients
    segments = cut(build(), builders.cut_layers(config))
    server = VerticalServer(
        segments.server,
        make_optimizer(),
        builders.make_objective(config),
        k,
        config.vertical.merge,
        label_client=0,
        client_specs=[specs_of(segments.client.outputs)[0]] * k,
        **label_protection(config),
    )
    server.build_optimizer()
    if int(config.privacy.leakage_examples) > 0:
        server.evaluation_leak = EvaluationLeak(config, server)
    # Every feature holder sends its part of each test batch.
    coordinator = Rounds(server, k, epochs, reports=True, evaluators=None)
    state = {"server": server.checkpoint()}
    parties = {"server": coordinator, "aligner": Aligner(k, leader=0)}
    return parties, coordinator, _with(state, coordinator)


def _multihop_host(config, host, build, make_optimizer, links, epochs):
    client, relay, server = hop_segments(build(), builders.cut_layers(config))
    if host == "relay":
        party = Relay(relay, make_optimizer(), links["server"])
        party.build_optimizer()
        return {"relay": party}, None, {"relay": party.checkpoint()}
    party = Server(server, make_optimizer(), builders.make_objective(config))
    party.build_optimizer()
    coordinator = Rounds(party, 1, epochs, reports=True)
    state = {"server": party_checkpoint([party.segment], party.optimizer)}
    return {"server": coordinator}, coordinator, _with(state, coordinator)


def _head(config, i, build, make_optimizer, epochs):
    segments = cut(build(), builders.cut_layers(config))
    head, _ = task_heads(segments.server, builders.cut_layers(config))[i]
    party = Server(head, make_optimizer(), builders.make_objective(config))
    party.build_optimizer()
    coordinator = Rounds(party, 1, epochs, reports=True)
    state = {"head": party_checkpoint([head], party.optimizer)}
    return {f"head_{i}": coordinator}, coordinator, _with(state, coordinator)


def relay_link_specs(config) -> dict:
    """What the relay's link to the server carries: its cut tensors' specs."""
    _, relay, server = hop_segments(
        builders.model_builder(config)(), builders.cut_layers(config)
    )
    return {
        "cut_dtypes": [wire_dtype(t.dtype) for t in relay.outputs],
        "cut_shapes": [t.shape for t in relay.outputs],
        "output_dtypes": [wire_dtype(t.dtype) for t in server.outputs],
    }


# ---------------------------------------------------------------- clients
NO_XLA_OVER_GRPC = (
    "client %d: config.train.jit_compile compiles the hosts' steps with XLA; "
    "this client's split steps hold their gRPC round trip and run compiled "
    "without XLA"
)


def client_program(config, k: int, links: dict, key=None, inbox=None, counters=None):
    """Client k's program (and its party), built from the config.

    Args:
      config: the run's config.
      k: the client's id.
      links: {party: link} for every party in `layout(config).client_links`
        (and "next", the next client's inbox, with a peer handoff).
      key: the clients' handoff key (round robin).
      inbox: this client's `Inbox` (peer handoff).
      counters: where to count handed-on bytes received from a peer.

    Returns:
      The program (`KerasTurns`, `FedClient`, `RoundClient`, `TaskClient`,
      `FedAvgClient` or `SGDClient`).
    """
    build = builders.model_builder(config)
    make_optimizer = lambda: builders.make_optimizer(config)  # noqa: E731
    jit_compile = bool(config.train.get("jit_compile", False))
    if config.method in ("fedavg", "large_batch_sgd"):
        # Their compiled steps hold no round trip: XLA takes them whole.
        objective = builders.make_objective(config)
        if config.method == "fedavg":
            return FedAvgClient(
                k,
                build(),
                make_optimizer(),
                objective,
                links["server"],
                config.fedavg.local_epochs,
                jit_compile,
            )
        return SGDClient(k, build(), objective, links["server"], jit_compile)
    if jit_compile:
        # A split client's step holds its round trip to the host (a
        # py_function between the forward and the backward pass), which XLA
        # cannot compile: the hosts' steps take XLA, this client's do not.
        logging.getLogger("splitkeras").info(NO_XLA_OVER_GRPC, k)
    run = {"run_eagerly": config.train.run_eagerly, "jit_compile": False}
    at = builders.cut_layers(config)
    if config.topology == "multihop":
        first = hop_segments(build(), at)[0]
        return RoundClient(
            _client(config, k, first, make_optimizer), links["relay"], True, **run
        )
    segments = cut(build(), at)
    if config.topology == "multitask":
        heads = task_heads(segments.server, at)
        client = _client(config, k, segments.client, make_optimizer)
        used = [u for _, u in heads]
        return TaskClient(
            client, [links[f"head_{i}"] for i in range(len(heads))], used, **run
        )
    tail = segments.tail
    objective = builders.make_objective(config) if tail is not None else None
    client = _client(config, k, segments.client, make_optimizer, tail, objective)
    if config.topology == "vertical":
        return RoundClient(client, links["server"], sends_labels=k == 0, **run)
    if config.method in ("splitfed_v1", "splitfed_v2"):
        return FedClient(client, links["server"], links["fed"], **run)
    return KerasTurns(
        client,
        links["server"],
        config.num_clients,
        key,
        config.weight_handoff,
        peer_link=links.get("next"),
        inbox=inbox,
        counters=counters,
        **dict(zip(("microbatches", "max_staleness"), pipelining(config))),
        **run,
    )


def _client(config, k, segment, make_optimizer, tail=None, objective=None) -> Client:
    client = Client(
        segment,
        make_optimizer(),
        client_id=k,
        tail=tail,
        objective=objective,
        privacy=from_config(config, k),
    )
    client.build_optimizer()
    return client
