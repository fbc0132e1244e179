"""Legacy inference job: ``mpiexec -n P python -m jobs.infer_mpi --config F [...]``.

Every MPI rank reads its shards, runs the predictor inline and writes its own CXI files (the
coupling LCLS peak finding has used with psana); rank 0 plans and writes the summary. See
slurm/infer_mpi.sbatch.
"""
import sys

from peaknet.infer.stage import job_main

if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:], mode="legacy"))
