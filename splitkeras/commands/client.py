r"""Runs one client of a split-learning run against its hosts (`splitkeras serve`).

  splitkeras client --config=fashion_mnist_lenet \
      --config.num_clients=2 --client_id=0 --connect=server=127.0.0.1:50051 \
      [--key_file=handoff.key] [--workdir=workdirs/client_0] \
      [--listen=50060 --connect=client_1=127.0.0.1:50061] \
      [--tls_dir=certs [--mutual_tls]] [--token_file=certs/tokens.json] \
      [--config.data.sites=sites]

`--connect` gives the address of every party this client sends to
(`splitkeras.deployment.layout`: server; SplitFed also fed; vertical also
aligner; multi-hop relay; multi-task head_0, head_1; a round robin with the
peer handoff also the next client, whose inbox listens on its --listen
port). Round robin clients share --key_file (make one with
`splitkeras.transport.sealing.write_key('handoff.key')`; `splitkeras launch`
puts it in each client's own client_<k>/secrets directory): client states
travel between clients sealed under it, and the server has no copy. With
--config.data.sites (a folder from `splitkeras partition`) the client reads
only its own file.
"""

from absl import flags

from splitkeras import cli, client_process
from splitkeras.transport import tls
from splitkeras.transport.tokens import read_tokens

_CONFIG = cli.define_config()
_CLIENT_ID = flags.DEFINE_integer("client_id", None, "This client's id (0..K-1).")
_CONNECT = flags.DEFINE_list(
    "connect", [], "party=host:port of every party it talks to."
)
_LISTEN = flags.DEFINE_integer(
    "listen", None, "Port of this client's inbox (peer handoff)."
)
_KEY_FILE = flags.DEFINE_string("key_file", None, "The clients' shared handoff key.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write summary and weights.")
_TLS_DIR = flags.DEFINE_string("tls_dir", None, "Directory with ca.pem: use TLS.")
_MUTUAL = flags.DEFINE_bool("mutual_tls", False, "Present client-K.pem/.key.")
_TOKEN_FILE = flags.DEFINE_string(
    "token_file", None, "JSON file holding this client's token ({id: token})."
)
flags.mark_flags_as_required(["config", "client_id", "connect"])


def main(argv):
    del argv
    k = _CLIENT_ID.value
    cli.check_config(_CONFIG.value)
    cli.use_threads(_CONFIG.value)
    cli.check_client_id(k, _CONFIG.value)
    credentials = None
    if _TLS_DIR.value:
        credentials = tls.channel_credentials(
            _TLS_DIR.value, k if _MUTUAL.value else None
        )
    token = read_tokens(_TOKEN_FILE.value)[k] if _TOKEN_FILE.value else None
    summary = client_process.run_client(
        _CONFIG.value,
        k,
        dict(item.split("=", 1) for item in _CONNECT.value),
        key=client_process.read_key(_KEY_FILE.value) if _KEY_FILE.value else None,
        workdir=_WORKDIR.value,
        token=token,
        credentials=credentials,
        listen=_LISTEN.value,
    )
    print(f"client {k} done: {summary}")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
