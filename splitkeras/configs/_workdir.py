"""The config of a run, read from its workdir's config.json (every override
it was started with included).

Commands that act on a finished run load it as `--config=<this file>:WORKDIR`
(`splitkeras export --workdir=W` does when no --config is given), so that
`--config.<field>=value` overrides apply on top of it as on any config.
"""

from splitkeras.runner import read_config


def get_config(workdir):
    return read_config(workdir)
