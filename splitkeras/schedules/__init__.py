"""Schedules: who trains when, and how weights travel between parties."""

from splitkeras.schedules.round_robin import RoundRobin

__all__ = ["RoundRobin", "schedule_for"]


def schedule_for(config, build_model, make_optimizer, loss, at):
    """The schedule for `config.method` with `config.num_clients` clients."""
    k = config.num_clients
    if config.method == "split":
        return RoundRobin(
            build_model,
            at,
            k,
            make_optimizer,
            loss,
            handoff=config.weight_handoff,
            codec=config.transport.codec,
            run_eagerly=config.train.run_eagerly,
        )
    raise ValueError(f"no multi-client schedule for config.method {config.method!r}")
