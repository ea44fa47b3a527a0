"""Starts a gRPC server and its clients as processes on this machine.

One command for a local distributed run (and for the tests): the server and
each client are separate Python processes running scripts/serve.py and
scripts/client.py, talking gRPC over 127.0.0.1, exactly as they would across
machines. The launcher makes the clients' handoff key, and with `tls=True`
a CA, certificates and per-client tokens, under the workdir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from splitkeras.distributed import write_key

__all__ = ["Launch", "launch"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Launch:
    """A running server + clients; `wait()` returns the server's summary."""

    def __init__(self, server, clients, workdir):
        self.server = server
        self.clients = clients
        self.workdir = workdir

    def wait(self, timeout: float = 1800.0) -> dict:
        """Waits for every process; the first to fail stops the run and is named."""
        deadline = time.monotonic() + timeout
        procs = {"server": self.server, **self.clients}
        while any(p.poll() is None for p in procs.values()):
            for name, proc in procs.items():
                code = proc.poll()
                if code not in (None, 0):
                    self.kill()
                    raise RuntimeError(
                        f"{name} exited with {code}; its log: "
                        f"{os.path.join(self.workdir, name + '.log')}"
                    )
            if time.monotonic() > deadline:
                self.kill()
                running = [n for n, p in procs.items() if p.poll() is None]
                raise TimeoutError(
                    f"{', '.join(running)} did not finish in {timeout:.0f} s"
                )
            time.sleep(0.2)
        failed = {n: p.returncode for n, p in procs.items() if p.returncode}
        if failed:
            raise RuntimeError(f"processes failed: {failed}; logs in {self.workdir}")
        with open(os.path.join(self.workdir, "server", "summary.json")) as f:
            return json.load(f)

    def kill(self) -> None:
        for proc in [self.server, *self.clients.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _python(script, args, log_path, env):
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", script), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )


def start_server(config_args, workdir, port=0, tls_args=(), env=None):
    """Starts scripts/serve.py; returns (process, port) once it listens."""
    port_file = os.path.join(workdir, "server.port")
    if os.path.exists(port_file):
        os.remove(port_file)
    proc = _python(
        "serve.py",
        [
            *config_args,
            f"--workdir={os.path.join(workdir, 'server')}",
            f"--port={port}",
            f"--port_file={port_file}",
            *tls_args,
        ],
        os.path.join(workdir, "server.log"),
        env,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"the server did not start; see {os.path.join(workdir, 'server.log')}"
            )
        time.sleep(0.1)
    with open(port_file) as f:
        return proc, int(f.read())


def start_client(config_args, workdir, port, k, client_args=(), env=None):
    """Starts scripts/client.py for client `k` against 127.0.0.1:`port`."""
    return _python(
        "client.py",
        [
            *config_args,
            f"--server=127.0.0.1:{port}",
            f"--client_id={k}",
            f"--key_file={os.path.join(workdir, 'handoff.key')}",
            f"--workdir={os.path.join(workdir, f'client_{k}')}",
            *client_args,
        ],
        os.path.join(workdir, f"client_{k}.log"),
        env,
    )


def credentials(workdir, num_clients) -> tuple[list, list]:
    """Makes TLS credentials and tokens; returns (server args, client args)."""
    from splitkeras.transport import tls

    directory = os.path.join(workdir, "credentials")
    if not os.path.exists(os.path.join(directory, tls.CA_CERT)):
        tls.write_credentials(directory, clients=num_clients)
        tls.write_tokens(os.path.join(directory, "tokens.json"), num_clients)
    tokens = os.path.join(directory, "tokens.json")
    return (
        [f"--tls_dir={directory}", f"--tokens={tokens}"],
        [f"--tls_dir={directory}", f"--token_file={tokens}"],
    )


def launch(config_args, workdir, num_clients, tls=False, env=None) -> Launch:
    """Starts a server and `num_clients` clients; returns the `Launch`.

    Args:
      config_args: the config flags every process gets, e.g.
        ["--config=configs/fashion_mnist_lenet.py", "--config.num_clients=2"].
      workdir: server/, client_K/, logs, the handoff key (and credentials/).
      num_clients: how many client processes (must match the config).
      tls: use TLS with per-client tokens (made under workdir/credentials).
      env: the processes' environment (None: inherit).
    """
    os.makedirs(workdir, exist_ok=True)
    key = os.path.join(workdir, "handoff.key")
    if not os.path.exists(key):
        write_key(key)
    server_args, client_args = credentials(workdir, num_clients) if tls else ([], [])
    server, port = start_server(config_args, workdir, 0, server_args, env)
    clients = {
        f"client_{k}": start_client(config_args, workdir, port, k, client_args, env)
        for k in range(num_clients)
    }
    return Launch(server, clients, workdir)
