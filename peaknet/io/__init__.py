"""Readers and writers of detector data, geometry, peak lists and streams.

Submodules are imported on use (``from peaknet.io.geometry import parse_geometry``) so that
importing :mod:`peaknet.io` stays cheap and optional dependencies (h5py, pycbf) load only
when a reader needs them.
"""
