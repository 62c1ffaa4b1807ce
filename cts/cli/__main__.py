"""``python -m cts.cli``."""

from cts.cli import main

main()
