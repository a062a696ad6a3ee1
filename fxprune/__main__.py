"""``python -m fxprune``: the same command line as the ``fxprune`` script."""
from fxprune.cli import main

main()
