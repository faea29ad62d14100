"""``python -m minaction``: the ``minaction`` command line."""
import sys

from .cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
