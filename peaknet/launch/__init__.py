"""Launchers that start peaknet jobs from Python (submitit on Slurm, or locally)."""
