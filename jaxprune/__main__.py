"""``python -m jaxprune``: the same command line as the ``jaxprune`` console script."""
import sys

from jaxprune.cli import main

sys.exit(main())
