"""Entry point: ``python -m jobs.simulate [--config F] [--section.key=value ...]``."""
import sys

from peaknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
