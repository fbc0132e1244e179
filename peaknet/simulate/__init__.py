"""Synthetic serial-crystallography frames with ground truth (``peaknet simulate``).

Modules:

- :mod:`~peaknet.simulate.crystal`: unit cells of the 7 crystal systems, metric tensors,
  reciprocal basis, centering absences, reflection lists, uniform random orientations;
- :mod:`~peaknet.simulate.diffraction`: Ewald-sphere prediction for stills (bandwidth,
  divergence, mosaicity), partiality, Wilson intensities, B-factor fall-off, polarisation;
- :mod:`~peaknet.simulate.detector`: static detector maps (solid angle, polarisation,
  background bases, beamstop, defects), spot rendering, photon counting, ADU conversion;
- :mod:`~peaknet.simulate.generator`: :class:`Simulator`, :func:`iter_frames`, :func:`run`;
- :mod:`~peaknet.simulate.writer`: CXI shards, truth files, manifest, summary;
- :mod:`~peaknet.simulate.config`: :class:`SimulateConfig` and its sections;
- :mod:`~peaknet.simulate.realism`: like-for-like statistics of real and simulated frames.

Typical use::

    from peaknet.simulate import SimulateConfig, iter_frames
    cfg = SimulateConfig()                      # Epix10ka2M, lysozyme-like defaults
    for frame, truth in iter_frames(cfg, 0, 10):
        ...                                     # frame (16, 352, 384) float32 ADU
"""
from .config import SimulateConfig, thermolysin_cspad_config
from .generator import FrameTruth, Simulator, iter_frames, run

__all__ = ["SimulateConfig", "thermolysin_cspad_config", "FrameTruth", "Simulator", "iter_frames", "run"]
