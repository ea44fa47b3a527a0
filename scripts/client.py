"""Runs one split-learning client against a server started by scripts/serve.py.

  python scripts/client.py --config=configs/fashion_mnist_lenet.py \
      --config.num_clients=2 --server=127.0.0.1:50051 --client_id=0 \
      --key_file=handoff.key [--workdir=workdirs/client_0] \
      [--tls_dir=certs [--mutual_tls]] [--token_file=certs/tokens.json]

Every client of a run needs the same --key_file (make one with
`python -c "from splitkeras.distributed import write_key; write_key('handoff.key')"`;
scripts/launch.py makes one in its workdir): client segments travel between
clients through the server encrypted under it, and the server has no copy.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import distributed  # noqa: E402
from splitkeras.transport import tls  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_SERVER = flags.DEFINE_string("server", None, "The server's host:port.")
_CLIENT_ID = flags.DEFINE_integer("client_id", None, "This client's id (0..K-1).")
_KEY_FILE = flags.DEFINE_string("key_file", None, "The clients' shared handoff key.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write summary and weights.")
_TLS_DIR = flags.DEFINE_string("tls_dir", None, "Directory with ca.pem: use TLS.")
_MUTUAL = flags.DEFINE_bool("mutual_tls", False, "Present client-K.pem/.key.")
_TOKEN_FILE = flags.DEFINE_string(
    "token_file", None, "JSON file holding this client's token ({id: token})."
)
flags.mark_flags_as_required(["config", "server", "client_id", "key_file"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("splitkeras").setLevel(std_logging.INFO)
    k = _CLIENT_ID.value
    credentials = None
    if _TLS_DIR.value:
        credentials = tls.channel_credentials(
            _TLS_DIR.value, k if _MUTUAL.value else None
        )
    token = tls.read_tokens(_TOKEN_FILE.value)[k] if _TOKEN_FILE.value else None
    summary = distributed.run_client(
        _CONFIG.value,
        _SERVER.value,
        k,
        distributed.read_key(_KEY_FILE.value),
        workdir=_WORKDIR.value,
        token=token,
        credentials=credentials,
    )
    print(f"client {k} done: {summary}")


if __name__ == "__main__":
    app.run(main)
