"""The `splitkeras` command: one subcommand per job.

  splitkeras train --config=fashion_mnist_lenet --workdir=workdirs/fmnist
  splitkeras serve | client | launch | export | partition | privacy-report |
             advise-cut | attack-table | resource-table | make-credentials |
             edge-client | predict ...
  splitkeras configs        the shipped configs, by name
  splitkeras <command> --help

Each subcommand is a module here, run as `__main__` (its `run()` reads
`sys.argv`; `--help` shows its docstring and flags); only the chosen one is
loaded, so the edge commands (`edge-client`, `predict`) run where TensorFlow
is not installed. `python -m splitkeras ...` is the same command.
"""

from __future__ import annotations

import runpy
import sys

__all__ = ["COMMANDS", "main"]

# name -> (module, what it does)
COMMANDS = {
    "train": ("train", "train one experiment in one process"),
    "serve": ("serve", "host a run's server (or another hosted party) over gRPC"),
    "client": ("client", "one client process of a run over gRPC"),
    "launch": ("launch", "every host and client process of a run on this machine"),
    "export": ("export", "a trained client segment as SavedModel, LiteRT, edge.json"),
    "partition": ("partition", "each site's data file from a dataset"),
    "privacy-report": ("privacy_report", "NoPeek / noise sweep with attacks"),
    "advise-cut": ("advise_cut", "every cut's cost and leakage; the cut to use"),
    "attack-table": ("attack_table", "every defense against every attack"),
    "resource-table": ("resource_table", "client FLOPs and bytes per method"),
    "make-credentials": ("make_credentials", "a CA, certificates and tokens"),
    "edge-client": ("edge_client", "train an exported segment with LiteRT (no TF)"),
    "predict": ("predict", "split inference with an exported segment (no TF)"),
}


def _usage() -> str:
    lines = ["usage: splitkeras <command> [flags]   (splitkeras <command> --help)", ""]
    lines += [f"  {name:17} {what}" for name, (_, what) in COMMANDS.items()]
    lines.append(f"  {'configs':17} list the shipped configs (--config=NAME)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs `splitkeras <command> ...` (argv without the program name)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name == "configs":
        from splitkeras import cli

        print("\n".join(cli.config_names()))
        return
    if name not in COMMANDS:
        print(f"splitkeras: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"splitkeras {name}", *rest]
    try:
        module = f"splitkeras.commands.{COMMANDS[name][0]}"
        runpy.run_module(module, run_name="__main__")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _TF_EXTRA:
            raise
        print(
            f"splitkeras {name}: needs {e.name}, which is not installed: "
            "pip install 'splitkeras[tf]'",
            file=sys.stderr,
        )
        sys.exit(1)


# What `pip install 'splitkeras[tf]'` adds (the edge commands need none).
_TF_EXTRA = {
    "absl",
    "keras",
    "matplotlib",
    "ml_collections",
    "tensorboard",
    "tensorflow",
    "tensorflow_datasets",
}
