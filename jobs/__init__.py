"""Thin entry points that Slurm templates (``slurm/*.sbatch``) and submitit launchers call.

Each ``jobs/<stage>.py`` parses nothing itself: it hands its arguments to
:func:`peaknet.cli.run_stage`, so a job, a submitit call and the ``peaknet`` command run the same
code with the same typed config.
"""
