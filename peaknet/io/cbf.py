"""Multi-panel CBF (imgCIF) frames, e.g. the LCLS CSPAD stills written by cctbx.xfel.

A CSPAD CBF holds one binary array per quadrant, (8, 185, 388) int32 (``x-CBF_PACKED``), and
describes every ASIC as an array *section* with its own fast/slow axes hanging off a tree of
axes (detector -> quadrant -> sensor -> ASIC) in the ``axis`` category; the settings of the
axes (rotation angles in degrees, translations in mm) are in ``diffrn_scan_frame_axis``.
:func:`read_cbf` decodes the data with ``pycbf`` and turns the metrology into a
:class:`peaknet.io.geometry.Geometry` with one raw panel per section (``q{array}a{section}``)
in a Cheetah-style slab (array q at fs = q * W, its slice k at ss = k * H), so the stack is
(arrays * slices, H, W) = (32, 185, 388) for CSPAD, in psana order.

Frames: imgCIF has the beam travelling along -z (``AXIS_SOURCE`` points to the source), +y
up; CrystFEL (peaknet) has the beam along +z. Positions are converted by a 180 degree
rotation about y: (x, y, z) -> (-x, y, -z). imgCIF axis displacements put the *corner* of the
first pixel at displacement 0 (as written by cctbx), i.e. CrystFEL's ``corner_x/y``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from peaknet.errors import DataError, GeometryError
from peaknet.io.geometry import HC_EV_NM, Geometry, Panel

HC_EV_A = HC_EV_NM * 10.0  # eV Angstrom
CSPAD_ASIC_WIDTH = 194  # fast-scan pixels of one CSPAD ASIC (two per 185 x 388 sensor)
_IMGCIF_TO_LAB = np.array([-1.0, 1.0, -1.0])  # imgCIF -> CrystFEL lab frame


@dataclass
class CBFFrame:
    """One CBF frame.

    stack: (P, H, W) pixel values as stored (int32 for CSPAD: (32, 185, 388)).
    geometry: the detector metrology of this file as a Geometry (clen and photon energy set).
    wavelength_A: X-ray wavelength in Angstrom.
    """

    path: str
    stack: np.ndarray
    geometry: Geometry
    wavelength_A: float

    @property
    def photon_energy_eV(self) -> float:
        """Photon energy in eV (hc / wavelength)."""
        return HC_EV_A / self.wavelength_A

    @property
    def distance_m(self) -> float:
        """Sample-detector distance (the geometry's clen) in metres."""
        return float(self.geometry.clen)

    @property
    def slab(self) -> np.ndarray:
        """The frame in the geometry's slab layout ((1480, 1552) for CSPAD)."""
        return self.geometry.stack_to_slab(self.stack)


def cbf_asic_to_stack(panel64, fs, ss):
    """DIALS-style CSPAD ASIC coordinates -> stack (module, ss, fs).

    panel64: ASIC index 0..63 (quadrant q = i // 16, sensor (i % 16) // 2, half i % 2), the
    panel order of a CSPAD CBF. fs, ss: ASIC-local pixel coordinates in the DIALS convention
    (pixel i spans [i, i + 1)). Returns module (i // 2, int32) and module-local ss, fs in
    peaknet's convention (centre of pixel i at i): ss - 0.5, fs - 0.5 + 194 * (i % 2).
    """
    p = np.asarray(panel64)
    if p.size and (p.min() < 0 or p.max() > 63):
        raise ValueError("panel64 must be in 0..63")
    half = p % 2
    return (
        (p // 2).astype(np.int32),
        np.asarray(ss, np.float64) - 0.5,
        np.asarray(fs, np.float64) - 0.5 + CSPAD_ASIC_WIDTH * half,
    )


# ============================================================================================
# reading
# ============================================================================================
def read_cbf(path) -> CBFFrame:
    """Read a (multi-panel) CBF file: pixel data, metrology and wavelength.

    Raises :class:`peaknet.errors.DataError` naming the file for a missing, truncated or
    corrupt file (the binary sections are checked against their MD5 digests) or a header
    peaknet cannot interpret.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    _verify_binary_sections(path)
    handle = _open(path)
    arrays = _read_arrays(handle, path)
    tables = _header_tables(handle, path)
    wavelength = _wavelength(tables, path)
    try:
        geometry = _geometry(tables, arrays, path, HC_EV_A / wavelength)
    except GeometryError as exc:
        raise DataError(path, exc.field, f"inconsistent metrology: {exc.problem}") from None
    stack = np.concatenate([a.reshape((-1,) + a.shape[-2:]) for _, a in arrays], axis=0)
    if stack.shape != geometry.stack_shape:
        raise DataError(
            path,
            "array_data",
            f"data stack {stack.shape} does not match the "
            f"metrology's modules {geometry.stack_shape}",
        )
    return CBFFrame(path, stack, geometry, wavelength)


_HEADER_TABLES = (
    "axis",
    "array_structure_list",
    "array_structure_list_axis",
    "diffrn_radiation_wavelength",
)
_OPTIONAL_TABLES = ("array_structure_list_section", "diffrn_scan_frame_axis", "diffrn_scan_axis")


class _Missing(KeyError):
    pass


def _header_tables(handle, path: str) -> dict:
    """The header categories the metrology needs (optional ones may be absent)."""
    tables = {}
    for name in _HEADER_TABLES + _OPTIONAL_TABLES:
        try:
            tables[name] = _table(handle, name)
        except _Missing:
            if name in _HEADER_TABLES:
                raise DataError(path, f"category {name}", "missing from the CBF header") from None
    return tables


def _pycbf():
    try:
        import pycbf
    except ImportError as exc:  # pragma: no cover - pycbf is a dependency
        raise ImportError("reading CBF files needs pycbf (pip install pycbf)") from exc
    return pycbf


_MIME_BOUNDARY = re.compile(rb"--CIF-BINARY-FORMAT-SECTION--\r?\n")
_BINARY_START = b"\x0c\x1a\x04\xd5"


def _verify_binary_sections(path: str) -> None:
    """Check every binary section's size and MD5 digest before cbflib decodes it.

    cbflib's decompressor can crash the process on damaged data, so damage (truncation,
    flipped bytes) is caught here first and reported as a DataError.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    for number, match in enumerate(_MIME_BOUNDARY.finditer(raw), start=1):
        start = raw.find(_BINARY_START, match.end())
        header = raw[match.end() : start] if start >= 0 else raw[match.end() :]
        field = f"binary section {number}"
        size = re.search(rb"X-Binary-Size:\s*(\d+)", header)
        if start < 0 or size is None:
            raise DataError(path, field, "truncated or malformed binary section header")
        data = raw[start + len(_BINARY_START) : start + len(_BINARY_START) + int(size.group(1))]
        if len(data) != int(size.group(1)):
            raise DataError(path, field, f"truncated: {len(data)} of {int(size.group(1))} bytes")
        digest = re.search(rb"Content-MD5:\s*(\S+)", header)
        if digest and base64.b64encode(hashlib.md5(data).digest()) != digest.group(1):
            raise DataError(path, field, "corrupt: MD5 digest does not match the data")


def _open(path: str):
    pycbf = _pycbf()
    handle = pycbf.cbf_handle_struct()
    try:
        handle.read_widefile(path.encode(), pycbf.MSG_DIGEST)
    except Exception as exc:  # pycbf raises plain Exception("CBFlib Error(s): ...")
        raise DataError(path, None, f"not a readable CBF file ({_cbf_message(exc)})") from None
    return handle


def _cbf_message(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _table(handle, category: str) -> list[dict]:
    """All rows of a CIF category as dicts of str (None for '.'/'?')."""
    try:
        handle.find_category(category.encode())
    except Exception:
        raise _Missing(category) from None
    names = []
    for c in range(handle.count_columns()):
        handle.select_column(c)
        names.append(handle.column_name().decode())
    rows = []
    for r in range(handle.count_rows()):
        row = {}
        for c, name in enumerate(names):
            handle.select_column(c)
            handle.select_row(r)
            try:
                value = handle.get_value()
            except Exception:
                value = None
            value = None if value is None else value.decode(errors="replace")
            row[name] = None if value in (".", "?") else value
        rows.append(row)
    return rows


def _read_arrays(handle, path: str) -> list[tuple[str, np.ndarray]]:
    """[(array_id, (slow, mid, fast) or (slow, fast) ndarray)] in binary order."""
    try:
        handle.find_category(b"array_data")
        n = handle.count_rows()
    except Exception:
        raise DataError(path, "array_data", "no image data in the file") from None
    out = []
    for r in range(n):
        try:
            handle.find_column(b"array_id")
            handle.select_row(r)
            array_id = handle.get_value().decode()
            handle.find_column(b"data")
            out.append((array_id, _decode(handle)))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                path, f"array_data row {r}", f"cannot decode binary data ({_cbf_message(exc)})"
            ) from None
    return out


def _decode(handle) -> np.ndarray:
    _, _, elsize, elsigned, _, nelem, _, _, _, nfast, nmid, nslow, _ = (
        handle.get_integerarrayparameters_wdims_fs()
    )
    dtype = np.dtype(f"{'i' if elsigned else 'u'}{elsize}").newbyteorder("<")
    data = np.frombuffer(handle.get_integerarray_as_string(), dtype=dtype)
    if data.size != nelem or nelem != nfast * max(nmid, 1) * max(nslow, 1):
        raise ValueError(f"{data.size} elements, header says {nelem} = {nslow} x {nmid} x {nfast}")
    shape = (nslow, nmid, nfast) if nslow > 1 else (max(nmid, 1), nfast)
    return data.astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def _wavelength(tables: dict, path: str) -> float:
    try:
        value = float(tables["diffrn_radiation_wavelength"][0]["wavelength"])
    except (IndexError, KeyError, TypeError, ValueError):
        raise DataError(
            path, "_diffrn_radiation_wavelength.wavelength", "missing or not a number"
        ) from None
    if not value > 0:
        raise DataError(
            path, "_diffrn_radiation_wavelength.wavelength", f"must be > 0, got {value}"
        )
    return value


# ============================================================================================
# metrology -> Geometry
# ============================================================================================
def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Right-handed rotation matrix about the unit vector ``axis``."""
    a = np.radians(degrees)
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


class _Axes:
    """The imgCIF axis tree with this frame's settings; positions in mm (imgCIF frame)."""

    def __init__(self, tables: dict, path: str):
        self.path = path
        self.axes = {row["id"]: row for row in tables["axis"]}
        self.settings = self._settings(tables)

    @staticmethod
    def _settings(tables: dict) -> dict:
        out = {}
        for row in tables.get("diffrn_scan_axis") or []:
            out[row["axis_id"]] = (_f(row.get("angle_start")), _f(row.get("displacement_start")))
        for row in tables.get("diffrn_scan_frame_axis") or []:
            out[row["axis_id"]] = (_f(row.get("angle")), _f(row.get("displacement")))
        return out

    def _transform(self, axis_id: str, displacement: Optional[float] = None):
        """(R, t) of one axis: a point p in its frame is R p + t in the parent frame."""
        row = self.axes.get(axis_id)
        if row is None:
            raise DataError(self.path, f"axis {axis_id}", "axis referenced but not defined")
        try:
            vector = np.array([float(row[f"vector[{i}]"]) for i in (1, 2, 3)])
        except (TypeError, ValueError, KeyError):
            raise DataError(
                self.path, f"axis {axis_id}", "vector is missing or not numeric"
            ) from None
        vector = vector / np.linalg.norm(vector)
        offset = np.array([_f(row.get(f"offset[{i}]")) for i in (1, 2, 3)])
        angle, shift = self.settings.get(axis_id, (0.0, 0.0))
        if displacement is not None:
            shift = displacement
        if row.get("type") == "rotation":
            return _rotation(vector, angle), offset
        if row.get("type") == "translation":
            return np.eye(3), offset + shift * vector
        return np.eye(3), offset

    def position(self, axis_id: str, overrides: dict) -> np.ndarray:
        """Position (mm, imgCIF frame) of the origin of ``axis_id``'s frame, with the
        displacements of the axes in ``overrides`` replaced."""
        point = np.zeros(3)
        seen = set()
        while axis_id:
            if axis_id in seen:
                raise DataError(self.path, f"axis {axis_id}", "axis dependencies form a loop")
            seen.add(axis_id)
            rot, trans = self._transform(axis_id, overrides.get(axis_id))
            point = rot @ point + trans
            axis_id = self.axes[axis_id].get("depends_on")
        return point


def _f(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@dataclass
class _Section:
    """One ASIC: its array, index ranges (1-based, inclusive) and fast/slow axis sets."""

    array_id: str
    section_id: str
    ranges: dict  # index -> (start, end)
    axis_sets: dict  # precedence (1 fast, 2 slow) -> axis_set_id


def _sections(tables: dict, arrays: list, path: str) -> list[_Section]:
    """Sections in file order; without a section table each array is one section."""
    shapes = {aid: a.shape for aid, a in arrays}
    axis_sets: dict = {}
    for row in tables["array_structure_list"]:
        key = (row["array_id"], row.get("array_section_id") or row["array_id"])
        if row.get("axis_set_id"):
            axis_sets.setdefault(key, {})[int(row["precedence"])] = row["axis_set_id"]
    ranges: dict = {}
    for row in tables.get("array_structure_list_section") or []:
        key = (row["array_id"], row["id"])
        ranges.setdefault(key, {})[int(row["index"])] = (int(row["start"]), int(row["end"]))
    if not ranges:
        for aid, shape in shapes.items():
            if len(shape) != 2:
                raise DataError(
                    path, "array_structure_list_section", f"3-D array {aid} without sections"
                )
            ranges[(aid, aid)] = {1: (1, shape[1]), 2: (1, shape[0])}
    out = []
    for (aid, sid), rng in ranges.items():
        sets = axis_sets.get((aid, sid))
        if not sets or 1 not in sets or 2 not in sets:
            raise DataError(path, f"section {sid}", "no fast/slow axes in array_structure_list")
        out.append(_Section(aid, sid, rng, sets))
    return out


def _pixel_axis(tables: dict, axis_set: str, path: str) -> tuple[str, float, float]:
    """(axis_id, displacement of the first pixel corner, increment) in mm."""
    for row in tables["array_structure_list_axis"]:
        if row["axis_set_id"] == axis_set:
            return row["axis_id"], _f(row.get("displacement")), float(row["displacement_increment"])
    raise DataError(path, f"axis set {axis_set}", "missing from array_structure_list_axis")


def _section_panel(
    sec: _Section, name: str, origin: tuple, axes: _Axes, tables: dict, path: str
) -> Panel:
    """A Panel (clen 0; positions absolute) for one section; origin = slab (ss, fs) of the
    section's array slice."""
    f_axis, f0, f_inc = _pixel_axis(tables, sec.axis_sets[1], path)
    s_axis, s0, s_inc = _pixel_axis(tables, sec.axis_sets[2], path)
    if abs(f_inc - s_inc) > 1e-9 * f_inc:
        raise DataError(path, f"section {sec.section_id}", "non-square pixels are not supported")

    def pos(f, s):
        return (
            _IMGCIF_TO_LAB
            * axes.position(f_axis, {f_axis: f0 + f * f_inc, s_axis: s0 + s * s_inc})
            * 1e-3
        )

    corner, fs_step, ss_step = pos(0, 0), pos(1, 0) - pos(0, 0), pos(0, 1) - pos(0, 0)
    pixel_m = f_inc * 1e-3
    (f_start, f_end), (s_start, s_end) = sec.ranges[1], sec.ranges[2]
    return Panel(
        name=name,
        min_fs=origin[1] + f_start - 1,
        max_fs=origin[1] + f_end - 1,
        min_ss=origin[0] + s_start - 1,
        max_ss=origin[0] + s_end - 1,
        fs=tuple(float(v) for v in fs_step / pixel_m),
        ss=tuple(float(v) for v in ss_step / pixel_m),
        corner_x=float(corner[0] / pixel_m),
        corner_y=float(corner[1] / pixel_m),
        res=1.0 / pixel_m,
        clen=0.0,
        coffset=float(corner[2]),
    )


def _geometry(tables: dict, arrays: list, path: str, photon_energy_eV: float) -> Geometry:
    """Geometry with one panel per section; clen = median panel z, coffset = the rest."""
    axes = _Axes(tables, path)
    order = [aid for aid, _ in arrays]
    shapes = {aid: a.shape for aid, a in arrays}
    panels, count = [], {}
    for sec in _sections(tables, arrays, path):
        if sec.array_id not in shapes:
            raise DataError(path, f"section {sec.section_id}", f"array {sec.array_id} has no data")
        q = order.index(sec.array_id)
        h, w = shapes[sec.array_id][-2:]
        k = sec.ranges.get(3, (1, 1))[0] - 1  # slice of a 3-D array
        j = count[q] = count.get(q, -1) + 1
        panels.append(_section_panel(sec, f"q{q}a{j}", (k * h, q * w), axes, tables, path))
    clen = float(np.median([p.coffset for p in panels]))
    panels = [dataclasses.replace(p, clen=clen, coffset=p.coffset - clen) for p in panels]
    return Geometry(panels=panels, photon_energy=float(photon_energy_eV), source=path)
