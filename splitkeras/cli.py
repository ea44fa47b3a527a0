"""What the `splitkeras` commands share: a user's mistake is one clear line.

`run(main)` replaces `absl.app.run(main)`:

- `--config=NAME[:ARG]` names a config shipped in `splitkeras/configs/`
  (`config_names()`), `--config=PATH[:ARG]` a config file; a name that is
  neither is refused with the names there are;
- before the flags are parsed, every `--config.<field>=...` override is
  looked up in the `--config=` file's config, and an unknown field is named
  with the fields next to it (instead of ml_collections' traceback);
- an error that describes a wrong input or setting (`USER_ERRORS`) ends the
  process with that one line and exit code 1. `SPLITKERAS_TRACEBACK=1` shows
  the traceback instead.

`check_config(config)` refuses values no run can take (no epochs, no
clients, an empty batch) before anything is built; `use_threads(config)`
sizes TensorFlow's thread pools (`config.runtime`) before its first op.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

__all__ = [
    "USER_ERRORS",
    "check_client_id",
    "check_config",
    "check_overrides",
    "config_args",
    "config_names",
    "config_path",
    "define_config",
    "run",
    "set_fields",
    "use_threads",
    "with_run_config",
]

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _user_errors() -> tuple:
    from splitkeras.runner import NonFiniteLossError
    from splitkeras.transport.grpc_client import RemoteError
    from splitkeras.transport.sealing import HandoffError

    return (
        ValueError,
        FileNotFoundError,
        HandoffError,
        RemoteError,
        NonFiniteLossError,
    )


USER_ERRORS = None  # filled on first use (importing them loads TensorFlow)


def config_names() -> list[str]:
    """The configs shipped with splitkeras, by name (`--config=NAME`); not
    `base`, which the others start from."""
    return sorted(
        name[: -len(".py")]
        for name in os.listdir(CONFIGS)
        if name.endswith(".py") and not name.startswith("_") and name != "base.py"
    )


def config_path(value: str) -> str:
    """`--config`'s value as a file path: a file path (with its `:ARG`) as
    given, or a shipped config's name (`fashion_mnist_lenet[:ARG]`) as its
    file's path.

    Raises:
      ValueError: `value` is neither an existing file nor a shipped name.
    """
    where, colon, arg = value.partition(":")
    # A bare name is a shipped config even where a folder of that name
    # exists (a workdir named after its config).
    if os.sep not in where and not where.endswith(".py") and where in config_names():
        return os.path.join(CONFIGS, f"{where}.py") + colon + arg
    if os.path.isfile(where):
        return value
    raise ValueError(
        f"--config={value}: no such config file, and no shipped config of "
        f"that name; shipped configs: {', '.join(config_names())}"
    )


def define_config():
    """The `--config` flag of a command (ml_collections' config file flag),
    which `run` lets name a shipped config too."""
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config: a shipped config's name (see `splitkeras configs`) "
        "or a config file's path; then --config.<field>=value overrides.",
    )


def _joined(args: list[str]) -> list[str]:
    """`args` with every --config flag in one piece: `--config V` as
    `--config=V`, `--config.a.b 2` as `--config.a.b=2` (`--noconfig.a.b`,
    a flag without a value, stays)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--config") and "=" not in arg and _is_value(value):
            arg, i = f"{arg}={value}", i + 1
        out.append(arg)
        i += 1
    return out


def _is_value(arg) -> bool:
    """Whether `arg`, after a flag without `=`, is that flag's value."""
    if arg is None:
        return False
    return not arg.startswith("-") or arg[1:2].isdigit() or arg[1:2] == "."


def _with_config_paths(args: list[str]) -> list[str]:
    """`_joined(args)` with the --config value turned into a path by
    `config_path`."""
    return [
        f"--config={config_path(a[len('--config=') :])}"
        if a.startswith("--config=")
        else a
        for a in _joined(args)
    ]


def with_run_config(argv: list[str]) -> list[str]:
    """`argv` with `--workdir` and no `--config`: the run's own config (its
    config.json, every override it was started with) as `--config`, so
    `--config.<field>` overrides apply on top of it (e.g. a dataset that
    moved: `--config.data.path=...`). For commands on a finished run."""
    args = argv[1:]
    if any(a == "--config" or a.startswith("--config=") for a in args):
        return argv
    workdir = None
    for i, arg in enumerate(args):
        if arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg == "--workdir" and i + 1 < len(args):
            workdir = args[i + 1]
    if not workdir:
        return argv  # the command's flags say what is missing
    run_config = os.path.join(CONFIGS, "_workdir.py")
    return [argv[0], f"--config={run_config}:{os.path.abspath(workdir)}", *args]


def config_args(args: list[str]) -> list[str]:
    """The `--config` flags among command-line `args`, each in one piece
    (`_joined`): what a launcher hands its processes."""
    return [a for a in _joined(args) if a.startswith(("--config", "--noconfig."))]


def set_fields(config, overrides: dict) -> list:
    """Sets each dotted field of `overrides` ({"train.epochs": 2, ...}) on
    `config`; returns the same as command-line flags (--config.a.b=value)."""
    flags = []
    for field, value in overrides.items():
        node = config
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        flags.append(f"--config.{field}={value}")
    return flags


def check_config(config) -> None:
    """Raises ValueError naming the first value no run can take."""
    for field, value in (
        ("num_clients", config.num_clients),
        ("train.epochs", config.train.epochs),
        ("train.batch_size", config.train.batch_size),
    ):
        if int(value) < 1:
            raise ValueError(f"config.{field}={value}: it must be at least 1")
    runtime = config.get("runtime", {})
    for field in ("intra_op_threads", "inter_op_threads"):
        if int(runtime.get(field, 0)) < 0:
            raise ValueError(
                f"config.runtime.{field}={runtime[field]}: it must be 0 "
                "(TensorFlow's default) or more"
            )
    if int(runtime.get("inter_op_threads", 0)) == 1:
        # A U-shaped server's step, paused between its two messages
        # (parties/paused_step.py), holds one inter-op thread meanwhile.
        raise ValueError(
            "config.runtime.inter_op_threads=1: a U-shaped server's step "
            "holds one inter-op thread while it waits for its second "
            "message; use 0 (TensorFlow's default) or at least 2"
        )


def use_threads(config) -> None:
    """Sets TensorFlow's intra-op and inter-op thread pools from
    `config.runtime` (0: TensorFlow's default, one thread per core). Call it
    before TensorFlow runs its first op; a process's pools cannot change
    after that (RuntimeError)."""
    runtime = config.get("runtime", {})
    intra = int(runtime.get("intra_op_threads", 0))
    inter = int(runtime.get("inter_op_threads", 0))
    if not (intra or inter):
        return
    import tensorflow as tf

    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    logging.getLogger("splitkeras").info(
        "TensorFlow threads: intra-op %s, inter-op %s",
        intra or "default",
        inter or "default",
    )


def check_client_id(client_id: int, config) -> None:
    """Raises ValueError unless 0 <= client_id < config.num_clients."""
    if not 0 <= client_id < int(config.num_clients):
        raise ValueError(
            f"--client_id={client_id}: this run's clients are 0.."
            f"{int(config.num_clients) - 1} (config.num_clients="
            f"{int(config.num_clients)})"
        )


def check_overrides(argv) -> None:
    """Raises ValueError for a `--config.<field>` the config file lacks."""
    args = _with_config_paths(argv[1:])
    path, config_arg = None, ""
    for arg in args:
        if arg.startswith("--config="):
            path, _, config_arg = arg.split("=", 1)[1].partition(":")
    if path is None:
        return  # absl reports a missing --config itself
    spec = importlib.util.spec_from_file_location("_splitkeras_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(config_arg) if config_arg else module.get_config()
    for arg in args:
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for part in field.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = f"config.{'.'.join(walked)}" if walked else "the config"
                raise ValueError(
                    f"unknown config field {field!r} (in {arg}): {where} has "
                    f"{', '.join(sorted(keys)) or 'no fields'}"
                )
            node, walked = node[part], [*walked, part]


def run(main) -> None:
    """`absl.app.run(main)`, with one line for a user's mistake; the
    splitkeras log at INFO, absl's (TensorFlow's) at WARNING."""
    from absl import app
    from absl import logging as absl_logging

    # A command run as __main__ by `splitkeras <command>`: its --help shows
    # its own docstring (absl prints the main module's).
    entry = sys.modules.get("__main__")
    if entry is not None and main.__globals__.get("__name__") == "__main__":
        entry.__doc__ = main.__globals__.get("__doc__")
    show = bool(os.environ.get("SPLITKERAS_TRACEBACK"))
    try:
        check_overrides(sys.argv)
        sys.argv = [sys.argv[0], *_with_config_paths(sys.argv[1:])]
    except (ValueError, FileNotFoundError) as e:
        if show:
            raise
        _fail(e)

    def guarded(argv):
        global USER_ERRORS
        # splitkeras's progress lines at INFO; TensorFlow's INFO chatter not.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("splitkeras").setLevel(logging.INFO)
        try:
            return main(argv)
        except Exception as e:
            if USER_ERRORS is None:
                USER_ERRORS = _user_errors()
            if show or not isinstance(e, USER_ERRORS):
                raise
            _fail(e)

    app.run(guarded)


def _fail(error) -> None:
    name = sys.argv[0] and os.path.basename(sys.argv[0])
    print(f"{name}: {type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(1)
