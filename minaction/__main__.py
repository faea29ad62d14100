"""``python -m minaction``: the ``minaction`` command line."""
import sys

from .cli import console_main

sys.exit(console_main())
