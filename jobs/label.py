"""Entry point: ``python -m jobs.label [--config F] [--section.key=value ...]``.

Runs the same way alone, under ``mpiexec -n N`` and under ``srun`` (slurm/label.sbatch): with
``--run.backend=mpi`` (or the default ``auto``, which picks MPI when a launcher started several
processes) every process takes its rank and size from mpi4py; rank 0 saves the config and prints
the summary.
"""
import sys

from peaknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
