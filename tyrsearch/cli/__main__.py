"""`python -m tyrsearch.cli` runs the command line (Ray Jobs and spawned workers start it so)."""

from tyrsearch.cli import main

main()
