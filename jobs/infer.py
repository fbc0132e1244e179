"""Hybrid inference job: ``mpiexec -n P python -m jobs.infer --config F [--section.key=value ...]``.

Every MPI rank is a producer; rank 0 also plans the run, creates the named Ray queues and actors
(in a fresh namespace) and writes the summary. Ranks connect to Ray at ``--ray.address=HOST:PORT``
(explicit; without it rank 0 starts a private loopback Ray). Also runs without MPI (one process,
``pipeline.producers`` threads). See slurm/infer.sbatch for a Slurm allocation.
"""
import sys

from peaknet.infer.stage import job_main

if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:], mode="hybrid"))
