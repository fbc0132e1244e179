"""Streaming reader for CrystFEL stream files (``indexamajig -o out.stream``).

A stream is a header (format line, command line, the geometry file and the target unit cell
between their own begin/end markers) followed by chunks, one per image::

    ----- Begin chunk -----
    Image filename: ...            Event: //3          Image serial number: 1
    hit = 1    indexed_by = xgandalf    photon_energy_eV = 9511.87    <key> = <value> ...
    Peaks from peak search
      fs/px   ss/px (1/d)/nm^-1   Intensity  Panel
      33.50   10.98       2.35      -78.50   q0a0
    End of peak list
    --- Begin crystal
    Cell parameters 6.135 12.197 16.881 nm, 90.5 91.2 90.5 deg
    astar = ... nm^-1   (bstar, cstar)   lattice_type = ...   centering = ...
    Reflections measured after indexing
       h    k    l          I   sigma(I)       peak background  fs/px  ss/px panel
    End of reflections
    --- End crystal
    ----- End chunk -----

:class:`StreamReader` reads the file line by line and yields one :class:`Chunk` at a time, so
memory does not grow with the file. Raw stream values are kept as they are. Stream positions
are CrystFEL *file* (slab) coordinates with pixel corners on integers (the centre of pixel i
is at i + 0.5); when a geometry is available each chunk also carries
:class:`peaknet.peaks.PeakList` objects in peaknet's convention (module index, module-local
ss/fs, centre of pixel i at i), i.e. ``slab = stream - 0.5`` then slab -> module via the geometry.

Malformed input raises :class:`peaknet.errors.StreamError` naming the file and ``line N``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

import numpy as np

from peaknet.errors import GeometryError, StreamError
from peaknet.peaks import PeakList

GEOM_BEGIN = "----- Begin geometry file -----"
GEOM_END = "----- End geometry file -----"
CELL_BEGIN = "----- Begin unit cell -----"
CELL_END = "----- End unit cell -----"
CHUNK_BEGIN = "----- Begin chunk -----"
CHUNK_END = "----- End chunk -----"
PEAKS_BEGIN = "Peaks from peak search"
PEAKS_END = "End of peak list"
CRYSTAL_BEGIN = "--- Begin crystal"
CRYSTAL_END = "--- End crystal"
REFL_BEGIN = "Reflections measured after indexing"
REFL_END = "End of reflections"

#: Stream coordinates put pixel corners on integers; peaknet puts pixel centres on integers.
STREAM_PIXEL_OFFSET = 0.5

_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
_CELL_RE = re.compile(
    rf"Cell parameters\s+({_FLOAT})\s+({_FLOAT})\s+({_FLOAT})\s+nm,\s*"
    rf"({_FLOAT})\s+({_FLOAT})\s+({_FLOAT})\s+deg"
)
_VEC_RE = re.compile(rf"([abc]star)\s*=\s*({_FLOAT})\s+({_FLOAT})\s+({_FLOAT})")
_SHIFT_RE = re.compile(rf"predict_refine/det_shift\s+x\s*=\s*({_FLOAT})\s+y\s*=\s*({_FLOAT})")


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclass
class StreamPeaks:
    """"Peaks from peak search" rows, raw stream values.

    fs, ss (N,) float64: slab position, pixel corners on integers (centre = i + 0.5);
    one_over_d (N,) float64: resolution 1/d in nm^-1; intensity (N,) float64 (ADU);
    panel (N,) str: panel name ("" when the stream has no panel column).
    """

    fs: np.ndarray
    ss: np.ndarray
    one_over_d: np.ndarray
    intensity: np.ndarray
    panel: np.ndarray

    def __len__(self) -> int:
        return int(self.fs.size)


@dataclass
class Reflections:
    """"Reflections measured after indexing" rows (predicted reflections), raw stream values.

    h, k, l (N,) int32; intensity, sigma, peak, background (N,) float64 (ADU);
    fs, ss (N,) float64 predicted slab position, pixel corners on integers; panel (N,) str.
    """

    h: np.ndarray
    k: np.ndarray
    l: np.ndarray  # noqa: E741 - Miller index
    intensity: np.ndarray
    sigma: np.ndarray
    peak: np.ndarray
    background: np.ndarray
    fs: np.ndarray
    ss: np.ndarray
    panel: np.ndarray

    def __len__(self) -> int:
        return int(self.h.size)


@dataclass
class Crystal:
    """One ``--- Begin crystal`` block.

    cell: (a, b, c) in nm and (alpha, beta, gamma) in degrees, as 6 floats;
    astar, bstar, cstar: (3,) reciprocal basis vectors in nm^-1 (lab frame);
    profile_radius, resolution_limit: nm^-1; det_shift_mm: (x, y) in mm;
    headers: every other ``key = value`` line; reflections: None if the stream omits them;
    predicted: the reflections as a PeakList in module coordinates (None without geometry).
    """

    cell: Optional[tuple] = None
    astar: Optional[np.ndarray] = None
    bstar: Optional[np.ndarray] = None
    cstar: Optional[np.ndarray] = None
    lattice_type: Optional[str] = None
    centering: Optional[str] = None
    unique_axis: Optional[str] = None
    profile_radius: Optional[float] = None
    resolution_limit: Optional[float] = None
    det_shift_mm: Optional[tuple] = None
    num_reflections: Optional[int] = None
    headers: dict = field(default_factory=dict)
    reflections: Optional[Reflections] = None
    predicted: Optional[PeakList] = None


@dataclass
class Chunk:
    """One image of the stream.

    filename, event (None in old streams), serial (``Image serial number``), hit, indexed_by
    ("none" if not indexed), n_indexing_tries, photon_energy_eV, num_peaks: as in the stream;
    headers: every ``key = value`` line of the chunk header as strings (e.g.
    ``hdf5/LCLS/detector0-EncoderValue``, ``average_camera_length``); peaks: the found peaks
    (None if the stream omits them); crystals: in stream order; peak_list: the found peaks as a
    PeakList in module coordinates (None without geometry); line: the line number of the chunk's
    begin marker (1-based).
    """

    filename: Optional[str] = None
    event: Optional[str] = None
    serial: Optional[int] = None
    hit: Optional[bool] = None
    indexed_by: Optional[str] = None
    n_indexing_tries: Optional[int] = None
    photon_energy_eV: Optional[float] = None
    num_peaks: Optional[int] = None
    headers: dict = field(default_factory=dict)
    peaks: Optional[StreamPeaks] = None
    crystals: list = field(default_factory=list)
    peak_list: Optional[PeakList] = None
    line: int = 0

    @property
    def indexed(self) -> bool:
        """True if the chunk has at least one crystal."""
        return bool(self.crystals)

    @property
    def event_id(self) -> str:
        """``"<filename> <event>"`` (CrystFEL's frame-list syntax), or the filename alone."""
        name = self.filename or ""
        return f"{name} {self.event}" if self.event else name


# --------------------------------------------------------------------------------------------
# line reading
# --------------------------------------------------------------------------------------------
class _Lines:
    """Line-by-line reader of a binary file that knows the current 1-based line number."""

    def __init__(self, fh: IO[bytes], path: str, line: int = 0):
        self.fh = fh
        self.path = path
        self.n = line

    def next(self) -> Optional[str]:
        """The next line without its newline, or None at end of file."""
        raw = self.fh.readline()
        if not raw:
            return None
        self.n += 1
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def error(self, problem: str, line: Optional[int] = None) -> StreamError:
        return StreamError(self.path, f"line {self.n if line is None else line}", problem)


def _key_value(line: str) -> Optional[tuple[str, str]]:
    if " = " not in line:
        return None
    key, value = line.split(" = ", 1)
    return key.strip(), value.strip()


def _first_number(value: str, lines: _Lines, key: str) -> float:
    try:
        return float(value.split()[0])
    except (ValueError, IndexError):
        raise lines.error(f"{key}: expected a number, got {value!r}") from None


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
_STOP_MARKERS = (CHUNK_BEGIN, CHUNK_END, CRYSTAL_BEGIN, CRYSTAL_END)


def _parse_row(text: str, n_num: int, int_cols: int) -> Optional[tuple[list, str]]:
    """(numbers, name) of a table row, or None if it is not ``n_num`` numbers (+ a name)."""
    parts = text.split()
    if len(parts) not in (n_num, n_num + 1):
        return None
    try:
        nums = [float(p) for p in parts[:n_num]]
    except ValueError:
        return None
    if any(not v.is_integer() for v in nums[:int_cols]):
        return None
    return nums, (parts[n_num] if len(parts) > n_num else "")


def _read_table(lines: _Lines, end: str, what: str, n_num: int, int_cols: int = 0):
    """Rows of ``n_num`` numbers plus an optional name column, up to the ``end`` marker.

    The first line is the column header (taken as a row if it parses as one, as CrystFEL
    does). Returns (numbers (N, n_num) float64, names list).
    """
    rows: list[list[float]] = []
    names: list[str] = []
    first = True
    while True:
        line = lines.next()
        if line is None:
            raise lines.error(f"file ends inside the {what} (missing {end!r})")
        text = line.strip()
        if text == end:
            break
        if text in _STOP_MARKERS or text in (PEAKS_BEGIN, REFL_BEGIN):
            raise lines.error(f"{text!r} inside the {what}: missing {end!r}")
        row = _parse_row(text, n_num, int_cols)
        if row is None and first:
            first = False
            continue  # the column header
        first = False
        if row is None:
            n = len(text.split())
            problem = (f"row has {n} fields, expected {n_num} or {n_num + 1}"
                       if n not in (n_num, n_num + 1) else "row is not numeric")
            raise lines.error(f"{what} {problem}: {text!r}")
        rows.append(row[0])
        names.append(row[1])
    return np.asarray(rows, np.float64).reshape(-1, n_num), names


def _read_peaks(lines: _Lines) -> StreamPeaks:
    arr, names = _read_table(lines, PEAKS_END, "peak list", 4)
    return StreamPeaks(
        fs=arr[:, 0], ss=arr[:, 1], one_over_d=arr[:, 2], intensity=arr[:, 3],
        panel=np.asarray(names, dtype=str),
    )


def _read_reflections(lines: _Lines) -> Reflections:
    arr, names = _read_table(lines, REFL_END, "reflection list", 9, int_cols=3)
    hkl = arr[:, :3].astype(np.int32)
    return Reflections(
        h=hkl[:, 0], k=hkl[:, 1], l=hkl[:, 2], intensity=arr[:, 3], sigma=arr[:, 4],
        peak=arr[:, 5], background=arr[:, 6], fs=arr[:, 7], ss=arr[:, 8],
        panel=np.asarray(names, dtype=str),
    )


# --------------------------------------------------------------------------------------------
# crystals and chunks
# --------------------------------------------------------------------------------------------
def _crystal_line(cr: Crystal, line: str, lines: _Lines) -> None:
    """Interpret one header line of a crystal block."""
    if line.startswith("Cell parameters"):
        m = _CELL_RE.match(line)
        if m is None:
            raise lines.error(f"cannot parse cell parameters: {line!r}")
        cr.cell = tuple(float(g) for g in m.groups())
        return
    m = _VEC_RE.match(line)
    if m is not None:
        setattr(cr, m.group(1), np.array([float(g) for g in m.groups()[1:]]))
        return
    m = _SHIFT_RE.match(line)
    if m is not None:
        cr.det_shift_mm = (float(m.group(1)), float(m.group(2)))
        return
    kv = _key_value(line)
    if kv is None:
        return  # e.g. "No integrated reflections."
    key, value = kv
    if key in ("lattice_type", "centering", "unique_axis"):
        setattr(cr, key, value)
    elif key == "profile_radius":
        cr.profile_radius = _first_number(value, lines, key)
    elif key == "diffraction_resolution_limit":
        cr.resolution_limit = _first_number(value, lines, key)
    elif key == "num_reflections":
        cr.num_reflections = int(_first_number(value, lines, key))
    else:
        cr.headers[key] = value


def _read_crystal(lines: _Lines) -> Crystal:
    start = lines.n
    cr = Crystal()
    while True:
        line = lines.next()
        if line is None:
            raise lines.error(f"file ends inside the crystal that begins at line {start} "
                              f"(missing {CRYSTAL_END!r})")
        text = line.strip()
        if text == CRYSTAL_END:
            return cr
        if text in (CHUNK_BEGIN, CHUNK_END, CRYSTAL_BEGIN):
            raise lines.error(f"{text!r} inside the crystal that begins at line {start}: "
                              f"missing {CRYSTAL_END!r}")
        if text == REFL_BEGIN:
            cr.reflections = _read_reflections(lines)
        else:
            _crystal_line(cr, text, lines)


_CHUNK_FIELDS = {
    "hit": lambda v: bool(int(float(v))),
    "indexed_by": str,
    "n_indexing_tries": lambda v: int(float(v)),
    "photon_energy_eV": lambda v: float(v.split()[0]),
    "num_peaks": lambda v: int(float(v)),
}


def _chunk_line(chunk: Chunk, text: str, lines: _Lines) -> None:
    """Interpret one header line of a chunk."""
    for prefix, attr, conv in (
        ("Image filename:", "filename", str),
        ("Event:", "event", str),
        ("Image serial number:", "serial", int),
    ):
        if text.startswith(prefix):
            value = text[len(prefix):].strip()
            try:
                setattr(chunk, attr, conv(value))
            except ValueError:
                raise lines.error(f"{prefix} bad value {value!r}") from None
            return
    kv = _key_value(text)
    if kv is None:
        return
    key, value = kv
    chunk.headers[key] = value
    conv = _CHUNK_FIELDS.get(key)
    if conv is not None:
        try:
            setattr(chunk, key, conv(value))
        except (ValueError, IndexError):
            raise lines.error(f"{key}: bad value {value!r}") from None


def _read_chunk(lines: _Lines) -> Chunk:
    """Parse a chunk whose begin marker was the last line read."""
    chunk = Chunk(line=lines.n)
    while True:
        line = lines.next()
        if line is None:
            raise lines.error(f"file ends inside the chunk that begins at line {chunk.line} "
                              f"(missing {CHUNK_END!r})")
        text = line.strip()
        if text == CHUNK_END:
            return chunk
        if text == CHUNK_BEGIN:
            raise lines.error(f"a new chunk begins inside the chunk from line {chunk.line}: "
                              f"missing {CHUNK_END!r}")
        if text in (CRYSTAL_END, PEAKS_END, REFL_END):
            raise lines.error(f"{text!r} without its begin marker")
        if text == PEAKS_BEGIN:
            chunk.peaks = _read_peaks(lines)
        elif text == CRYSTAL_BEGIN:
            chunk.crystals.append(_read_crystal(lines))
        else:
            _chunk_line(chunk, text, lines)


# --------------------------------------------------------------------------------------------
# header
# --------------------------------------------------------------------------------------------
def _read_block(lines: _Lines, end: str, what: str) -> str:
    start = lines.n
    out = []
    while True:
        line = lines.next()
        if line is None:
            raise lines.error(f"file ends inside the {what} that begins at line {start} "
                              f"(missing {end!r})")
        if line.strip() == end:
            return "\n".join(out) + "\n"
        if line.strip() == CHUNK_BEGIN:
            raise lines.error(f"a chunk begins inside the {what} that begins at line {start} "
                              f"(missing {end!r})")
        out.append(line)


_LENGTH_UNITS = {"A": 1.0, "nm": 10.0}


def parse_cell_text(text: str) -> dict:
    """A CrystFEL unit-cell file as a dict.

    Keys: lattice_type, centering, unique_axis (strings, when present); a, b, c in Angstrom;
    al, be, ga in degrees (floats, when present).
    """
    cell: dict = {}
    for line in text.splitlines():
        line = line.split(";", 1)[0].strip()
        kv = _key_value(line)
        if kv is None:
            continue
        key, value = kv
        parts = value.split()
        if key in ("a", "b", "c") and parts:
            unit = parts[1] if len(parts) > 1 else "A"
            cell[key] = float(parts[0]) * _LENGTH_UNITS.get(unit, 1.0)
        elif key in ("al", "be", "ga") and parts:
            cell[key] = float(parts[0])
        else:
            cell[key] = value
    return cell


# --------------------------------------------------------------------------------------------
# coordinates
# --------------------------------------------------------------------------------------------
def _stream_to_module(geometry, fs, ss, panel_names, path, line) -> tuple:
    """Stream (slab, corner-on-integer) positions -> (panel index, ss, fs) module coordinates.

    Positions are shifted to pixel centres (``- 0.5``) and converted by the panel named in the
    stream (the authoritative assignment; a position on a panel edge is not re-assigned); rows
    without a panel name go by position (module -1 and NaN outside every module).
    """
    ss_c = np.asarray(ss, np.float64) - STREAM_PIXEL_OFFSET
    fs_c = np.asarray(fs, np.float64) - STREAM_PIXEL_OFFSET
    if ss_c.size == 0:
        z = np.zeros(0)
        return z.astype(np.int32), z, z
    try:
        if all(panel_names):
            return geometry.slab_to_stack_coords_by_name(list(panel_names), ss_c, fs_c)
        return geometry.slab_to_stack_coords(ss_c, fs_c)  # old streams: no panel column
    except KeyError as exc:
        raise StreamError(path, f"line {line}",
                          f"chunk names panel {exc} which is not in the geometry") from None
    except (ValueError, GeometryError) as exc:
        raise StreamError(path, f"line {line}", f"cannot convert to module coordinates: {exc}"
                          ) from None


def _attach_peak_lists(chunk: Chunk, geometry, path: str) -> None:
    if chunk.peaks is not None:
        p = chunk.peaks
        panel, ss, fs = _stream_to_module(geometry, p.fs, p.ss, p.panel, path, chunk.line)
        chunk.peak_list = PeakList.from_columns(
            len(p), panel=panel, ss=ss, fs=fs, intensity=p.intensity
        )
    for cr in chunk.crystals:
        r = cr.reflections
        if r is None:
            continue
        panel, ss, fs = _stream_to_module(geometry, r.fs, r.ss, r.panel, path, chunk.line)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(r.sigma > 0, r.intensity / r.sigma, 0.0)
        cr.predicted = PeakList.from_columns(
            len(r), panel=panel, ss=ss, fs=fs, intensity=r.intensity, max_value=r.peak, snr=snr
        )


# --------------------------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------------------------
class StreamReader:
    """Iterate over the chunks of a CrystFEL stream without loading the file.

    Parameters
    ----------
    path:
        The ``.stream`` file.
    geometry:
        A :class:`peaknet.io.geometry.Geometry` to convert positions to module coordinates;
        default: parsed from the geometry embedded in the stream (if any). Pass ``False`` to
        skip conversion (``Chunk.peak_list`` and ``Crystal.predicted`` stay None).

    Attributes (read from the header when constructed): ``format_version`` (e.g. "2.3"),
    ``generated_by``, ``command_line``, ``geometry_text`` (str or None), ``target_cell``
    (dict from :func:`parse_cell_text`, or None). Each ``iter(reader)`` re-reads the file
    from the first chunk.
    """

    def __init__(self, path: os.PathLike | str, geometry=None):
        self.path = os.fspath(path)
        if not Path(self.path).is_file():
            raise StreamError(self.path, None, "file does not exist")
        self.format_version: Optional[str] = None
        self.generated_by: Optional[str] = None
        self.command_line: Optional[str] = None
        self.geometry_text: Optional[str] = None
        self.target_cell: Optional[dict] = None
        self._geometry = geometry
        self._start = (0, 0)  # (byte offset, line number) of the first chunk
        self._read_header()

    # --- header ----------------------------------------------------------------------
    def _read_header(self) -> None:
        with open(self.path, "rb") as fh:
            lines = _Lines(fh, self.path)
            while True:
                offset = fh.tell()
                line = lines.next()
                if line is None or line.strip() == CHUNK_BEGIN:
                    self._start = (offset, lines.n - (line is not None))
                    return
                self._header_line(line, lines)

    def _header_line(self, line: str, lines: _Lines) -> None:
        text = line.strip()
        if text.startswith("CrystFEL stream format"):
            self.format_version = text.split()[-1]
        elif text.startswith("Generated by"):
            self.generated_by = text[len("Generated by"):].strip()
        elif text == GEOM_BEGIN:
            self.geometry_text = _read_block(lines, GEOM_END, "geometry file")
        elif text == CELL_BEGIN:
            self.target_cell = parse_cell_text(_read_block(lines, CELL_END, "unit cell"))
        elif text == CHUNK_END:
            raise lines.error(f"{CHUNK_END!r} before any {CHUNK_BEGIN!r}")
        elif text and self.command_line is None and self.generated_by is not None:
            self.command_line = text

    @property
    def geometry(self):
        """The geometry used for module coordinates (parsed lazily), or None."""
        if self._geometry is None and self.geometry_text is not None:
            from peaknet.io.geometry import parse_geometry

            self._geometry = parse_geometry(self.geometry_text)
        return None if self._geometry is False else self._geometry

    # --- chunks ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        geometry = self.geometry
        with open(self.path, "rb") as fh:
            offset, line_no = self._start
            fh.seek(offset)
            lines = _Lines(fh, self.path, line_no)
            while True:
                line = lines.next()
                if line is None:
                    return
                text = line.strip()
                if text == CHUNK_BEGIN:
                    chunk = _read_chunk(lines)
                    if geometry is not None:
                        _attach_peak_lists(chunk, geometry, self.path)
                    yield chunk
                elif text == GEOM_BEGIN:  # concatenated streams repeat their header
                    _read_block(lines, GEOM_END, "geometry file")
                elif text == CELL_BEGIN:
                    _read_block(lines, CELL_END, "unit cell")
                elif text in (CHUNK_END, CRYSTAL_BEGIN, CRYSTAL_END, PEAKS_BEGIN, REFL_BEGIN):
                    raise lines.error(f"{text!r} outside a chunk")


def read_stream(path: os.PathLike | str, geometry=None) -> list[Chunk]:
    """All chunks of a (small) stream as a list; prefer iterating :class:`StreamReader`."""
    return list(StreamReader(path, geometry))
