"""Serves one split-learning run: the server party, over gRPC.

  python scripts/serve.py --config=configs/fashion_mnist_lenet.py \
      --config.num_clients=2 --workdir=workdirs/grpc_server --port=50051 \
      [--tls_dir=certs [--mutual_tls]] [--tokens=certs/tokens.json]

Clients join with scripts/client.py (or scripts/edge_client.py). Start it
again with the same --workdir to resume after a crash: it restores its last
checkpoint (the end of the last finished turn) and the clients carry on.

With --predict it serves split inference instead (until stopped): the
server segment trained in --workdir answers PREDICT messages, e.g. from
scripts/predict.py.
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
_WORKDIR = flags.DEFINE_string("workdir", None, "The server's directory.")
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
_PREDICT = flags.DEFINE_bool(
    "predict", False, "Serve predictions with the server trained in --workdir."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("splitkeras").setLevel(std_logging.INFO)
    credentials = (
        tls.server_credentials(_TLS_DIR.value, mutual=_MUTUAL.value)
        if _TLS_DIR.value
        else None
    )
    tokens = tls.read_tokens(_TOKENS.value) if _TOKENS.value else None

    def started(port):
        if _PORT_FILE.value:
            with open(_PORT_FILE.value + ".tmp", "w") as f:
                f.write(str(port))
            os.replace(_PORT_FILE.value + ".tmp", _PORT_FILE.value)

    serve = distributed.serve_predictions if _PREDICT.value else distributed.serve
    summary = serve(
        _CONFIG.value,
        _WORKDIR.value,
        address=f"{_HOST.value}:{_PORT.value}",
        credentials=credentials,
        tokens=tokens,
        on_started=started,
    )
    print(f"server done: {summary}")


if __name__ == "__main__":
    app.run(main)
