r"""Makes the TLS certificates and client tokens for the gRPC transport.

  splitkeras make-credentials --out=credentials \
      [--hosts=localhost,127.0.0.1,server.example.org] [--clients=2] \
      [--notokens]

Writes a fresh CA (ca.pem, ca.key), a server certificate for --hosts
(server.pem, server.key), --clients client certificates (client-k.pem,
client-k.key) and, unless --notokens, tokens.json with one token per client.
Running it again replaces everything, CA included. See docs/security.md.
"""

import os

from absl import app, flags

from splitkeras import cli
from splitkeras.transport import tls
from splitkeras.transport.tokens import write_tokens

_OUT = flags.DEFINE_string("out", None, "Directory to write the credentials to.")
_HOSTS = flags.DEFINE_list(
    "hosts",
    ["localhost", "127.0.0.1"],
    "Comma-separated DNS names and IP addresses clients dial the server by.",
)
_CLIENTS = flags.DEFINE_integer(
    "clients", 2, "Number of client certificates and tokens.", lower_bound=0
)
_TOKENS = flags.DEFINE_bool("tokens", True, "Also write tokens.json.")
flags.mark_flags_as_required(["out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths = tls.write_credentials(
        _OUT.value, hosts=_HOSTS.value, clients=_CLIENTS.value
    )
    if _TOKENS.value:
        token_path = os.path.join(_OUT.value, "tokens.json")
        write_tokens(token_path, _CLIENTS.value)
        paths["tokens.json"] = token_path
    for name in sorted(paths):
        print(paths[name])
    print(
        f"server certificate for {', '.join(_HOSTS.value)}; "
        f"{_CLIENTS.value} client certificate(s). Keep ca.key offline and the "
        "*.key and tokens.json files private (mode 0600)."
    )


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
