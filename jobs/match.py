"""Entry point: ``python -m jobs.match [--config F] [--section.key=value ...]``."""
import sys

from peaknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["match", *sys.argv[1:]]))
