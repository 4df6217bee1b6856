"""`python -m tyrsearch` runs the command line."""

from tyrsearch.cli import main

main()
