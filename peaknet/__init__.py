"""PeakNet: Bragg peak finding at facility scale."""
__version__ = "0.1.0"
