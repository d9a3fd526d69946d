"""``python -m snapbus`` runs the command line."""

from snapbus.cli import main

main()
