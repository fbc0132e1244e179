"""Entry point: ``python -m jobs.find_peaks [--config F] [--section.key=value ...]``.

Runs the same way alone, under ``mpiexec -n N`` and under ``srun`` (slurm/find_peaks.sbatch):
with ``--run.backend=mpi`` (or the default ``auto``, which picks MPI when a launcher started
several processes) every process takes its rank and size from mpi4py and finds the peaks of its
own shards; rank 0 saves the config, merges, writes the per-input ``<stem>.peaks.cxi`` files and
prints the summary. ``--run.backend=ray`` runs one driver on a Ray cluster instead.
"""
import sys

from peaknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["find-peaks", *sys.argv[1:]]))
