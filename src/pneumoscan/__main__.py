"""``python -m pneumoscan``."""

from pneumoscan.cli import main

main()
