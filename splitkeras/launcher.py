"""Starts every process of a run on this machine: its hosts, then its clients.

One command for a local distributed run of any configuration (and for the
tests): each host (`splitkeras serve --party=...`) and each client
(`splitkeras client`) is a separate Python process talking gRPC over
127.0.0.1, exactly as they would across machines. The hosts and the parties
they serve come from `deployment.layout(config)`; the launcher starts them
in order (a relay after the server it talks to), then the clients with the
address of every party they talk to. It makes the clients' handoff key, and
with `tls=True` a CA, certificates and per-client tokens. Each client's
secrets (the handoff key, its own token) go into its own directory,
`workdir/client_<k>/secrets` (mode 0700, files 0600); the hosts' directories
hold neither the key nor any client's token file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

from splitkeras import deployment
from splitkeras.transport.mirror import SECRET_VARIABLE
from splitkeras.transport.sealing import read_key, write_key

log = logging.getLogger("splitkeras")

__all__ = [
    "KILL_AFTER_STEPS",
    "Launch",
    "kill_after",
    "launch",
    "start_client",
    "start_host",
]

# Fault tests: a process started with this variable set to N kills itself
# (SIGKILL, no clean-up) right after its N-th training step: a host after
# applying its N-th training message, a client after its N-th step.
KILL_AFTER_STEPS = "SPLITKERAS_KILL_AFTER_STEPS"


def kill_after(steps: int, last: str = "") -> None:
    """SIGKILLs this process if `steps` reached $SPLITKERAS_KILL_AFTER_STEPS;
    the log line names `last` (what was applied last), if given."""
    limit = int(os.environ.get(KILL_AFTER_STEPS, "0") or 0)
    if limit and steps >= limit:
        after = f" after {last}" if last else ""
        log.warning("%s=%d: killing this process%s", KILL_AFTER_STEPS, limit, after)
        os.kill(os.getpid(), signal.SIGKILL)


class Launch:
    """A running set of hosts and clients; `wait()` returns the summary of
    the first host (with every host's under "hosts" when there are several).

    `starts` holds, for each process, how to start it again with the same
    command (a host on the same port): `restart(name)` after a crash.
    """

    def __init__(self, hosts: dict, clients: dict, workdir: str, starts=None):
        self.hosts = hosts
        self.clients = clients
        self.workdir = workdir
        self.starts = dict(starts or {})

    def restart(self, name: str, env=None):
        """Starts process `name` again (its old one must have exited)."""
        group = self.hosts if name in self.hosts else self.clients
        if group[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        group[name] = self.starts[name](env)
        return group[name]

    @property
    def server(self):
        return next(iter(self.hosts.values()))

    def processes(self) -> dict:
        return {**self.hosts, **self.clients}

    def wait(self, timeout: float = 1800.0) -> dict:
        """Waits for every process; the first to fail stops the run and is named."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.processes().values()):
            for name, proc in self.processes().items():
                code = proc.poll()
                if code not in (None, 0):
                    self.kill()
                    raise RuntimeError(
                        f"{name} exited with {code}; its log: "
                        f"{os.path.join(self.workdir, name + '.log')}"
                    )
            if time.monotonic() > deadline:
                self.kill()
                running = [n for n, p in self.processes().items() if p.poll() is None]
                raise TimeoutError(
                    f"{', '.join(running)} did not finish in {timeout:.0f} s"
                )
            time.sleep(0.2)
        summaries = {}
        for name in self.hosts:
            path = os.path.join(self.workdir, name, "summary.json")
            if os.path.exists(path):
                with open(path) as f:
                    summaries[name] = json.load(f)
        first = dict(summaries[next(iter(summaries))])
        if len(summaries) > 1:
            first["hosts"] = summaries
        return first

    def kill(self) -> None:
        for proc in self.processes().values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _python(command, args, log_path, env):
    """`python -m splitkeras <command> <args>`, in this process's folder."""
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "splitkeras", command, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_host(config_args, workdir, name, port=0, connect=(), tls_args=(), env=None):
    """Starts `splitkeras serve` for host `name`; returns (process, port) once
    it listens."""
    port_file = os.path.join(workdir, f"{name}.port")
    if os.path.exists(port_file):
        os.remove(port_file)
    args = [
        *config_args,
        f"--workdir={os.path.join(workdir, name)}",
        f"--party={name}",
        f"--port={port}",
        f"--port_file={port_file}",
        *tls_args,
    ]
    if connect:
        args.append("--connect=" + ",".join(f"{p}={a}" for p, a in connect.items()))
    proc = _python("serve", args, os.path.join(workdir, f"{name}.log"), env)
    deadline = time.monotonic() + 120
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"{name} did not start; see {os.path.join(workdir, name + '.log')}"
            )
        time.sleep(0.1)
    with open(port_file) as f:
        return proc, int(f.read())


def start_client(
    config_args, workdir, k, connect, listen=None, client_args=(), env=None
):
    """Starts `splitkeras client` for client `k` with `connect` {party: address}
    (its handoff key from `client_secrets`)."""
    args = [
        *config_args,
        f"--client_id={k}",
        "--connect=" + ",".join(f"{p}={a}" for p, a in connect.items()),
        f"--key_file={os.path.join(secrets_dir(workdir, k), KEY_FILE)}",
        f"--workdir={os.path.join(workdir, f'client_{k}')}",
        *client_args,
    ]
    if listen is not None:
        args.append(f"--listen={listen}")
    return _python("client", args, os.path.join(workdir, f"client_{k}.log"), env)


KEY_FILE = "handoff.key"
TOKEN_FILE = "token.json"


def secrets_dir(workdir, k) -> str:
    """Client k's own secrets (handoff key, token): workdir/client_k/secrets."""
    return os.path.join(workdir, f"client_{k}", "secrets")


def client_secrets(workdir, num_clients) -> None:
    """Gives every client the run's handoff key (made once, kept across
    restarts) in its own secrets directory (0700; the key 0600)."""
    first = os.path.join(secrets_dir(workdir, 0), KEY_FILE)
    key = read_key(first) if os.path.exists(first) else None
    for k in range(num_clients):
        directory = secrets_dir(workdir, k)
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o700)
        key = write_key(os.path.join(directory, KEY_FILE), key)


def credentials(workdir, num_clients) -> tuple[list, dict]:
    """Makes TLS credentials and tokens; returns (host args, {k: client k's
    args}). The hosts read every token (`credentials/tokens.json`); client
    k gets only its own, in its secrets directory, with its own TLS folder
    (the CA's certificate, its own certificate and key)."""
    from splitkeras.transport import tls
    from splitkeras.transport.tokens import read_tokens, write_file, write_tokens

    directory = os.path.join(workdir, "credentials")
    tokens = os.path.join(directory, "tokens.json")
    if not os.path.exists(os.path.join(directory, tls.CA_CERT)):
        tls.write_credentials(directory, clients=num_clients)
        write_tokens(tokens, num_clients)
    client_args = {}
    for k, token in read_tokens(tokens).items():
        own = os.path.join(secrets_dir(workdir, k), TOKEN_FILE)
        os.makedirs(os.path.dirname(own), exist_ok=True)
        write_file(own, json.dumps({str(k): token}).encode(), 0o600)
        # Its own TLS folder: the CA's certificate and its own certificate
        # and key, never the CA's key or another client's.
        own_tls = os.path.join(secrets_dir(workdir, k), "tls")
        os.makedirs(own_tls, exist_ok=True)
        for name, mode in (
            (tls.CA_CERT, 0o644),
            (tls.client_cert_name(k), 0o644),
            (tls.client_key_name(k), 0o600),
        ):
            with open(os.path.join(directory, name), "rb") as f:
                write_file(os.path.join(own_tls, name), f.read(), mode)
        client_args[k] = [f"--tls_dir={own_tls}", f"--token_file={own}"]
    return [f"--tls_dir={directory}", f"--tokens={tokens}"], client_args


def start_hosts(config, config_args, workdir, host_args=(), envs=None, starts=None):
    """Starts every host of `config`'s layout in order; returns
    ({host: process}, {party: address}).

    Args:
      envs: {host: environment} (None, or a host not in it: inherit).
      starts: a dict to record, for each host, how to start it again on
        the same port (`Launch.restart`).
    """
    layout = deployment.layout(config)
    envs = envs or {}
    hosts, addresses = {}, {}
    for name, parties in layout.hosts.items():
        connect = {p: addresses[p] for p in layout.host_links.get(name, [])}
        if name == "server" and config.server.strategy == "multi_worker":
            proc, port, followers = _start_server_workers(
                config, config_args, workdir, host_args, envs
            )
        else:
            proc, port = start_host(
                config_args, workdir, name, 0, connect, host_args, envs.get(name)
            )
            followers = {}
        hosts[name] = proc
        hosts.update(followers)
        for party in parties:
            addresses[party] = f"127.0.0.1:{port}"
        if starts is not None and followers:
            for process in (name, *followers):
                starts[process] = _no_lone_restart
        elif starts is not None:
            starts[name] = functools.partial(
                _restart_host, config_args, workdir, name, port, connect, host_args
            )
    return hosts, addresses


def _no_lone_restart(env=None):
    raise RuntimeError(
        "a multi_worker server's processes restart together (their collective "
        "ops join them): stop the run and launch it again with the same workdir"
    )


def _start_server_workers(config, config_args, workdir, host_args, envs):
    """A multi-worker server on this machine: `config.server.workers`
    processes, each with its TF_CONFIG (worker 0, the chief, serves the
    clients; the others follow it). Returns (chief, its port, {name: other
    worker})."""
    count = int(config.server.workers)
    if count < 2:
        raise ValueError(
            f"config.server.workers={count}: a multi_worker server has at "
            "least 2 worker processes (one machine: use 'mirrored')"
        )
    cluster = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    port = free_port()
    secret = secrets.token_urlsafe(32)  # the followers' proof to the chief

    def env(name, index):
        own = dict(envs.get(name) or os.environ)
        own["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        )
        own[SECRET_VARIABLE] = secret
        return own

    # The other workers first: the strategy's variables are made together.
    tls_dir = [a for a in host_args if a.startswith("--tls_dir=")]
    followers = {}
    for index in range(1, count):
        name = f"server_worker_{index}"
        args = [
            *config_args,
            f"--workdir={os.path.join(workdir, 'server')}",
            f"--chief=127.0.0.1:{port}",
            *tls_dir,
        ]
        log_path = os.path.join(workdir, f"{name}.log")
        followers[name] = _python("serve", args, log_path, env(name, index))
    chief, port = start_host(
        config_args, workdir, "server", port, (), host_args, env("server", 0)
    )
    return chief, port, followers


def _restart_host(config_args, workdir, name, port, connect, host_args, env):
    return start_host(config_args, workdir, name, port, connect, host_args, env)[0]


def client_connections(config, addresses, inbox_ports=None) -> list:
    """Each client's {party: address}, with the next client's inbox (peer)."""
    layout = deployment.layout(config)
    k_all = config.num_clients
    connections = []
    for k in range(k_all):
        connect = {p: addresses[p] for p in layout.client_links}
        if inbox_ports:
            following = (k + 1) % k_all
            connect[f"client_{following}"] = f"127.0.0.1:{inbox_ports[following]}"
        connections.append(connect)
    return connections


def launch(
    config_args, workdir, config, tls=False, envs=None, client_flags=None
) -> Launch:
    """Starts every host and client of `config`'s run; returns the `Launch`.

    Args:
      config_args: the config flags every process gets, e.g.
        ["--config=fashion_mnist_lenet", "--config.num_clients=2"].
      workdir: each process's directory and log, the handoff key (and
        credentials/).
      config: the same config, resolved (for its layout).
      tls: use TLS with per-client tokens (made under workdir/credentials).
      envs: {process name ("server", "client_0", ...): its environment};
        the others inherit this one's.
      client_flags: {k: more flags of client k}, e.g. its own
        `--config.data.sites` folder.
    """
    deployment.check_over_grpc(config)
    os.makedirs(workdir, exist_ok=True)
    envs = envs or {}
    client_secrets(workdir, config.num_clients)
    host_args, client_args = (
        credentials(workdir, config.num_clients) if tls else ([], {})
    )
    starts = {}
    hosts, addresses = start_hosts(
        config, config_args, workdir, host_args, envs, starts
    )
    peers = deployment.layout(config).peers and config.num_clients > 1
    inbox_ports = [free_port() for _ in range(config.num_clients)] if peers else None
    clients = {}
    for k, connect in enumerate(client_connections(config, addresses, inbox_ports)):
        name = f"client_{k}"
        listen = inbox_ports[k] if inbox_ports else None
        own = [*client_args.get(k, ()), *(client_flags or {}).get(k, ())]
        starts[name] = functools.partial(
            start_client, config_args, workdir, k, connect, listen, own
        )
        clients[name] = starts[name](envs.get(name))
    return Launch(hosts, clients, workdir, starts)
