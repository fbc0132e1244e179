"""Entry point: ``python -m jobs.find_peaks [--config F] [--section.key=value ...]``."""
import sys

from peaknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["find-peaks", *sys.argv[1:]]))
