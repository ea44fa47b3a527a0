r"""Serves one host of a split-learning run over gRPC (the server side).

  splitkeras serve --config=fashion_mnist_lenet \
      --config.num_clients=2 --workdir=workdirs/grpc_server --port=50051 \
      [--party=server] [--connect=server=HOST:PORT] \
      [--tls_dir=certs [--mutual_tls]] [--tokens=certs/tokens.json]

`--party` names the host of the run's layout (`splitkeras.deployment`):
"server" (every configuration has it but multi-task), "fed" (SplitFed's
fed server in a process of its own), "relay" (multi-hop; `--connect` gives
the server's address), "head_0", "head_1" (multi-task). The host reads no
dataset. Start it again with the same --workdir to resume after a crash:
it goes back to its last commit and the clients carry on.

A server on several machines (`--config.server.strategy=multi_worker`, each
process with its TF_CONFIG): worker 0, the chief, is started as above and
serves the clients; every other worker follows it:

  TF_CONFIG='{"cluster": {"worker": ["s0:2222", "s1:2222"]},
              "task": {"type": "worker", "index": 1}}' \
  splitkeras serve --config=... --config.server.strategy=multi_worker \
      --workdir=workdirs/grpc_server --chief=s0:50051 [--tls_dir=certs]

With --hijack=PATH it is a red team's host: a feature-space hijacker
(Pasquini et al., CCS 2021) answers in the place of round robin's server,
trained on the first --hijack_examples training inputs of PATH (a dataset
as config.data.path takes one: .npz, IDX folder or TFDS directory; the
attacker's own data). It trains no task: it is there to check a client's
hijack guard (config.privacy.hijack_probe_every) over the real transport.

With --predict it serves split inference instead (until stopped): the
server segment trained in --workdir answers PREDICT messages, e.g. from
`splitkeras predict`.
"""

import os

from absl import flags

from splitkeras import cli, host_process
from splitkeras.transport import tls
from splitkeras.transport.tokens import read_tokens

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "This host's directory.")
_PARTY = flags.DEFINE_string("party", "server", "Which host of the run to serve.")
_CONNECT = flags.DEFINE_list(
    "connect", [], "party=host:port of parties on other hosts (a relay: server=...)."
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 50051, "Port to listen on (0: any).")
_PORT_FILE = flags.DEFINE_string(
    "port_file", None, "Write the bound port here once listening."
)
_TLS_DIR = flags.DEFINE_string(
    "tls_dir", None, "Directory with server.pem/server.key (and ca.pem): TLS."
)
_MUTUAL = flags.DEFINE_bool("mutual_tls", False, "Require client certificates.")
_TOKENS = flags.DEFINE_string(
    "tokens", None, "tokens.json of every client; without it any client id is accepted."
)
_CHIEF = flags.DEFINE_string(
    "chief",
    None,
    "HOST:PORT of worker 0 of a multi_worker server: this process is one of "
    "the other workers (TF_CONFIG index >= 1) and follows it.",
)
_PREDICT = flags.DEFINE_bool(
    "predict", False, "Serve predictions with the server trained in --workdir."
)
_HIJACK = flags.DEFINE_string(
    "hijack",
    None,
    "Red team: a dataset (as config.data.path) whose training inputs a "
    "feature-space hijacker trains on; it answers in the place of round "
    "robin's server.",
)
_HIJACK_EXAMPLES = flags.DEFINE_integer(
    "hijack_examples",
    1000,
    "How many of --hijack's training inputs it takes.",
    lower_bound=1,
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.check_config(_CONFIG.value)
    cli.use_threads(_CONFIG.value)
    credentials = (
        tls.server_credentials(_TLS_DIR.value, mutual=_MUTUAL.value)
        if _TLS_DIR.value
        else None
    )
    tokens = read_tokens(_TOKENS.value) if _TOKENS.value else None

    def started(port):
        if _PORT_FILE.value:
            with open(_PORT_FILE.value + ".tmp", "w") as f:
                f.write(str(port))
            os.replace(_PORT_FILE.value + ".tmp", _PORT_FILE.value)

    address = f"{_HOST.value}:{_PORT.value}"
    if _HIJACK.value and (_CHIEF.value or _PREDICT.value):
        raise ValueError("--hijack serves training, not with --chief or --predict")
    if _CHIEF.value:
        summary = host_process.follow(
            _CONFIG.value,
            _WORKDIR.value,
            _CHIEF.value,
            credentials=tls.channel_credentials(_TLS_DIR.value)
            if _TLS_DIR.value
            else None,
        )
        print(f"server worker done: {summary}")
        return
    if _PREDICT.value:
        host_process.serve_predictions(
            _CONFIG.value,
            _WORKDIR.value,
            address=address,
            credentials=credentials,
            tokens=tokens,
            on_started=started,
        )
        return
    summary = host_process.serve(
        _CONFIG.value,
        _WORKDIR.value,
        address=address,
        credentials=credentials,
        tokens=tokens,
        on_started=started,
        host=_PARTY.value,
        connect=dict(item.split("=", 1) for item in _CONNECT.value),
        connect_credentials=tls.channel_credentials(_TLS_DIR.value)
        if _TLS_DIR.value
        else None,
        token=read_tokens(_TOKENS.value)[0] if _TOKENS.value else None,
        hijack_inputs=host_process.hijack_inputs(
            _CONFIG.value, _HIJACK.value, _HIJACK_EXAMPLES.value
        )
        if _HIJACK.value
        else None,
    )
    print(f"{_PARTY.value} done: {summary}")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
