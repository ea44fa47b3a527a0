"""`python -m splitkeras <command> ...`: the `splitkeras` command."""

from splitkeras.commands import main

main()
