"""Peak matching (PeakDiff) and curation of training frames (the paper's data engine, 2.1.1).

- :mod:`peaknet.match.peakdiff`: one-to-one matching of two peak sets per frame, precision and
  recall per frame and overall;
- :mod:`peaknet.match.curate`: selection rules, the manifest, input adapters (stream, CXI files,
  PeakLists);
- :mod:`peaknet.match.plots`: the figures (imported on demand; needs matplotlib).
"""
from peaknet.match.curate import (
    CurationResult,
    CurationRules,
    curate,
    frames_from_cxi,
    frames_from_peaklists,
    frames_from_stream,
    read_manifest,
    select_frames,
    write_manifest,
)
from peaknet.match.peakdiff import FrameMatch, MatchTable, match_frames, match_peaks

__all__ = [
    "CurationResult",
    "CurationRules",
    "FrameMatch",
    "MatchTable",
    "curate",
    "frames_from_cxi",
    "frames_from_peaklists",
    "frames_from_stream",
    "match_frames",
    "match_peaks",
    "read_manifest",
    "select_frames",
    "write_manifest",
]
