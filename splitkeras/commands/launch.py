r"""One command for a local distributed run of any configuration.

  splitkeras launch --config=fashion_mnist_lenet \
      --config.num_clients=2 --workdir=workdirs/grpc [--tls]

Every host (`splitkeras serve`: the server; SplitFed's fed server, a
multi-hop relay, multi-task heads where the config has them) and every
client (`splitkeras client`) is its own process talking gRPC over 127.0.0.1;
logs are workdir/<host>.log and workdir/client_K.log.
"""

import sys

from absl import flags

from splitkeras import cli, launcher

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run.")
_TLS = flags.DEFINE_bool("tls", False, "TLS with per-client tokens.")
_CLIENTS = flags.DEFINE_integer(
    "clients", None, "Client processes (default: --config.num_clients)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # The --config flags go to the server and every client.
    config_args = cli.config_args(sys.argv[1:])
    config = _CONFIG.value
    config.num_clients = _CLIENTS.value or config.num_clients
    config_args.append(f"--config.num_clients={config.num_clients}")
    cli.check_config(config)
    run = launcher.launch(config_args, _WORKDIR.value, config, tls=_TLS.value)
    summary = run.wait()
    first = next(iter(run.hosts))
    print(
        f"done: test accuracy {summary.get('test_accuracy', float('nan')):.4f}, "
        f"{summary['steps']} steps, {summary['wall_seconds']:.0f} s; "
        f"summary in {_WORKDIR.value}/{first}/summary.json"
    )


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
