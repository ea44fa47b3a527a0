"""`python -m splitkeras <command> ...`: the `splitkeras` command."""

from splitkeras.commands import main

if __name__ == "__main__":
    main()
