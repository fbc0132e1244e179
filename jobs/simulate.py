"""Entry point: ``python -m jobs.simulate [--config F] [--section.key=value ...]``.

Alone it writes every shard; under ``mpiexec -n N`` / ``srun`` (``--run.backend=mpi`` or the
default ``auto``) each rank writes its own shards and rank 0 the manifest and summary; in a Slurm
array task (``--run.array=true``, set by slurm/simulate.sbatch) it writes the task's shards
(see :mod:`peaknet.simulate.distributed`).
"""
import sys

from peaknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
