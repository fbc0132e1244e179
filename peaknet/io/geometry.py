"""CrystFEL detector geometry (``.geom``): parsing, writing, layouts and lab-frame maps.

Conventions (see also docs/dev/CONTRACTS.md)
--------------------------------------------
* **Lab frame** (CrystFEL): +z along the beam (away from the source), +y up, +x completes a
  right-handed frame. The sample is at the origin; the beam axis is the z axis. Metres.
* **Raw panels** are the ``.geom`` panels (``geom.panels``), each a rectangle
  ``min_fs..max_fs x min_ss..max_ss`` (inclusive) of the data array, the **slab**.
* **Modules / stack**: panels are grouped into P modules of equal shape (H, W) and a frame is a
  (P, H, W) stack (psana layout). Module = panel when all panels have the same shape; CSPAD
  geometries with 64 ASICs of 185 x 194 are grouped into 32 two-ASIC sensors of 185 x 388
  (likewise 176 x 192 ePix10k ASICs into 352 x 384 and 256 x 256 Jungfrau ASICs into
  512 x 1024 modules, when they tile). Module order is the order in which the file first
  mentions one of its panels (q0a0/q0a1 -> 0, q0a2/q0a3 -> 1, ... for CSPAD = psana order).
* **Pixel coordinates** in peaknet put the *centre* of pixel (i, j) at (i, j): pixel i covers
  [i - 0.5, i + 0.5). CrystFEL's own coordinates (stream files, ``corner_x``) put pixel
  *corners* on integers; ``corner_x/corner_y`` is the lab position (in pixels) of the outer
  corner of the panel's first pixel, so the centre of panel pixel (ss, fs) is at
  ``corner + (fs + 0.5) * fs_vec + (ss + 0.5) * ss_vec``.
* Camera length: ``z = clen + coffset + (fs_vec_z * fs + ss_vec_z * ss) / res``. A ``clen``
  given as a data path keeps the path (``panel.clen`` is a str); the value read from the data
  file is in ``geom.clen_scale`` metres per unit (CrystFEL: mm unless the line says ``m``),
  see :meth:`Geometry.clen_from_file_value`. Methods that need metres take ``clen=``.

Units: positions in metres, radii in pixels, resolution 1/d in nm^-1 (1/d = 2 sin(theta) /
lambda), angles in radians, photon energy in eV.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from peaknet.errors import GeometryError

log = logging.getLogger(__name__)

HC_EV_NM = 1239.8419843320026  # h c in eV nm: lambda[nm] = HC_EV_NM / E[eV]

#: Raw ASIC shape -> module shape for detectors whose .geom files list ASICs.
ASIC_MODULE_SHAPES = {(185, 194): (185, 388), (176, 192): (352, 384), (256, 256): (512, 1024)}

BUILTIN_GEOMETRIES = ("cspad", "epix10ka2m", "jungfrau4m")

Vector = tuple  # (x, y, z) floats


# ============================================================================================
# data classes
# ============================================================================================
@dataclass
class Panel:
    """One CrystFEL panel.

    min_fs..max_fs, min_ss..max_ss: inclusive pixel ranges in the data array (slab).
    fs, ss: lab-frame vectors (x, y, z) of one pixel step along fast/slow scan, in pixels
    (|v| ~ 1; a z component tilts the panel). corner_x, corner_y: lab position of the outer
    corner of the first pixel, in pixels. res: pixels per metre. clen: camera length in
    metres, a data path (str), or None when unset. coffset: extra z offset in metres.
    dims: {axis: '%' | 'ss' | 'fs' | '<fixed index>'} of the data block. extra: keys kept
    verbatim (unknown to peaknet or not used by it).
    """

    name: str
    min_fs: int
    max_fs: int
    min_ss: int
    max_ss: int
    fs: Vector
    ss: Vector
    corner_x: float
    corner_y: float
    res: float
    clen: Union[float, str, None] = None
    coffset: float = 0.0
    adu_per_eV: Optional[float] = None
    adu_per_photon: Optional[float] = None
    max_adu: Optional[float] = None
    no_index: bool = False
    mask_edge_pixels: int = 0
    data: Optional[str] = None
    dims: dict = field(default_factory=dict)
    mask: Optional[str] = None
    mask_file: Optional[str] = None
    mask_good: Optional[int] = None
    mask_bad: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        """Number of rows (slow scan)."""
        return self.max_ss - self.min_ss + 1

    @property
    def width(self) -> int:
        """Number of columns (fast scan)."""
        return self.max_fs - self.min_fs + 1

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)

    @property
    def layout_key(self) -> tuple:
        """Panels with equal keys share one 2-D data array (same dataset, same fixed dims)."""
        fixed = tuple(sorted((k, v) for k, v in self.dims.items() if v not in ("%", "ss", "fs")))
        return (self.data, fixed)


@dataclass
class BadRegion:
    """A CrystFEL bad region: either lab x/y limits in pixels (``min_x..max_x``,
    ``min_y..max_y``) or inclusive slab limits ``min_fs..max_fs, min_ss..max_ss`` on ``panel``."""

    name: str
    min_x: Optional[float] = None
    max_x: Optional[float] = None
    min_y: Optional[float] = None
    max_y: Optional[float] = None
    min_fs: Optional[int] = None
    max_fs: Optional[int] = None
    min_ss: Optional[int] = None
    max_ss: Optional[int] = None
    panel: Optional[str] = None

    @property
    def kind(self) -> str:
        """'xy' (lab pixel limits) or 'fsss' (slab pixel limits on one panel)."""
        return "xy" if self.min_x is not None else "fsss"


@dataclass
class AssemblyIndex:
    """How :meth:`Geometry.assemble` places stack pixels into a 2-D image.

    rows, cols: (P, H, W) int64 image indices of every stack pixel (-1 where no panel).
    shape: (rows, cols) of the image. beam: (row, col) of the beam axis (an integer pixel
    centre). pixel_size: image pixel size in metres. The image shows the detector viewed along
    the beam (CrystFEL GUI orientation): +x to the right (columns), +y up (decreasing rows).
    """

    rows: np.ndarray
    cols: np.ndarray
    shape: tuple
    beam: tuple
    pixel_size: float


# ============================================================================================
# value parsing
# ============================================================================================
_NUM = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_VEC_TERM = re.compile(rf"([+-]?)({_NUM})?([xyz])")
_VEC_FULL = re.compile(rf"(?:[+-]?(?:{_NUM})?[xyz])+")

_INT_KEYS = {"min_fs", "max_fs", "min_ss", "max_ss", "mask_edge_pixels"}
_FLOAT_KEYS = {"corner_x", "corner_y", "res", "coffset", "adu_per_eV", "adu_per_photon", "max_adu"}
_STR_KEYS = {"data", "mask", "mask_file"}
_BITS_KEYS = {"mask_good", "mask_bad"}
_PANEL_KEYS = _INT_KEYS | _FLOAT_KEYS | _STR_KEYS | _BITS_KEYS | {"fs", "ss", "no_index", "clen"}
_REQUIRED = ("min_fs", "max_fs", "min_ss", "max_ss", "fs", "ss", "corner_x", "corner_y", "res")
#: Per-panel keys CrystFEL knows that peaknet keeps verbatim in ``panel.extra``.
_KNOWN_PANEL_EXTRA = re.compile(
    r"^(flag_lessthan|flag_morethan|flag_equal|saturation_map|saturation_map_file|"
    r"mask\d_(data|file|goodbits|badbits)|adu_scale|rail_direction|clen_for_centering)$"
)
#: Global keys CrystFEL knows that peaknet keeps verbatim in ``geom.extra``.
_KNOWN_GLOBAL_EXTRA = {
    "electron_voltage",
    "detector_shift_x",
    "detector_shift_y",
    "photon_energy_bandwidth",
    "photon_energy_scale",
    "bandwidth",
}
_MASK0_ALIASES = {
    "mask0_data": "mask",
    "mask0_file": "mask_file",
    "mask0_goodbits": "mask_good",
    "mask0_badbits": "mask_bad",
}


class _Bad(ValueError):
    """A value that does not parse; the caller adds file and line."""


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Bad(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _Bad(f"expected a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    value = _number(text)
    if value != int(value):
        raise _Bad(f"expected an integer, got {text!r}")
    return int(value)


def _bits(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise _Bad(f"expected an integer bit mask (e.g. 0x0001), got {text!r}") from None


def _boolean(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no"):
        return False
    raise _Bad(f"expected 1/0/true/false, got {text!r}")


def parse_vector(text: str) -> Vector:
    """Parse a CrystFEL direction like ``-0.0048x +0.99998y`` or ``+1x -0.01 y +0.002z``.

    Returns (x, y, z) floats. Raises ValueError for other syntax, a repeated axis, or zero.
    """
    compact = re.sub(r"\s+", "", text)
    if not compact or not _VEC_FULL.fullmatch(compact):
        raise _Bad(f"cannot parse direction vector {text!r} (expected e.g. '-0.0048x +0.99998y')")
    comps = {}
    for sign, num, axis in _VEC_TERM.findall(compact):
        if axis in comps:
            raise _Bad(f"axis {axis!r} appears twice in direction vector {text!r}")
        value = float(num) if num else 1.0
        comps[axis] = -value if sign == "-" else value
    vec = (comps.get("x", 0.0), comps.get("y", 0.0), comps.get("z", 0.0))
    if not any(vec):
        raise _Bad(f"direction vector {text!r} is zero")
    return vec


def _split_unit(text: str, units: dict) -> tuple[str, Optional[float]]:
    """'95.3 mm' -> ('95.3', factor of mm); factor None when no unit is given."""
    parts = text.split()
    if len(parts) == 2 and parts[1] in units:
        return parts[0], units[parts[1]]
    if len(parts) != 1:
        raise _Bad(f"cannot parse {text!r}: expected a value and optionally one of {list(units)}")
    return parts[0], None


def _number_or_path(text: str, units: dict, what: str) -> tuple[Union[float, str], Optional[float]]:
    body, factor = _split_unit(text, units)
    if body.startswith("/"):
        return body, factor
    try:
        return _number(body), factor
    except _Bad:
        raise _Bad(
            f"{what} must be a number or a data path starting with '/', got {text!r}"
        ) from None


def _clen_value(text: str) -> tuple[Union[float, str], Optional[float]]:
    """clen: number (m unless 'mm') -> metres; path -> (path, metres per file unit or None)."""
    value, factor = _number_or_path(text, {"m": 1.0, "mm": 1e-3}, "clen")
    if isinstance(value, float):
        return value * (1.0 if factor is None else factor), None
    return value, factor


def _convert_panel_value(key: str, text: str):
    if key in _INT_KEYS:
        return _integer(text)
    if key in _FLOAT_KEYS:
        return _number(text)
    if key in _BITS_KEYS:
        return _bits(text)
    if key in ("fs", "ss"):
        return parse_vector(text)
    if key == "no_index":
        return _boolean(text)
    if key == "clen":
        return _clen_value(text)
    return text


# ============================================================================================
# parser
# ============================================================================================
@dataclass
class _Entry:
    value: str
    line: int


class _Parser:
    """Line-by-line reader of CrystFEL geometry text; builds a :class:`Geometry`."""

    def __init__(self, text: str, source: Optional[str]):
        self.source = source
        self.defaults: dict[str, _Entry] = {}
        self.panels: dict[str, dict[str, _Entry]] = {}  # own keys, in order of first mention
        self.panel_defaults: dict[str, dict[str, _Entry]] = {}  # global defaults at first mention
        self.bad: dict[str, dict[str, _Entry]] = {}
        self.globals: dict[str, _Entry] = {}
        self.rigid_groups: dict[str, list[str]] = {}
        self.collections: dict[str, list[str]] = {}
        self.groups: dict[str, list[str]] = {}
        self.extra: dict[str, str] = {}
        self.text = text

    def error(self, line: Optional[int], problem: str, field_: Optional[str] = None):
        return GeometryError(self.source, field_ or (f"line {line}" if line else None), problem)

    # --- lines ----------------------------------------------------------------------------
    def run(self, module_shape=None) -> "Geometry":
        for number, raw in enumerate(self.text.splitlines(), start=1):
            self._line(number, raw)
        panels = self._build_panels()
        bad = [self._build_bad(name, keys) for name, keys in self.bad.items()]
        return self._build_geometry(panels, bad, module_shape)

    def _line(self, number: int, raw: str) -> None:
        text = raw.split(";", 1)[0].strip()
        if not text:
            return
        if "=" not in text:
            raise self.error(number, f"expected 'key = value', got {text!r}")
        key, value = (s.strip() for s in text.split("=", 1))
        if not key or not value:
            raise self.error(number, f"expected 'key = value', got {text!r}")
        if " " in key:
            raise self.error(number, f"key {key!r} contains a space")
        entry = _Entry(value, number)
        if "/" in key:
            self._prefixed(key, entry)
        else:
            self._global(key, entry)

    def _prefixed(self, key: str, entry: _Entry) -> None:
        prefix, sub = key.split("/", 1)
        if not prefix or not sub or "/" in sub:
            raise self.error(entry.line, f"cannot parse key {key!r} (expected 'panel/key')")
        sub = _MASK0_ALIASES.get(sub, sub)
        if prefix.startswith("bad"):
            self.bad.setdefault(prefix, {})[sub] = entry
            return
        if prefix.startswith("group") or prefix.startswith("rigid_group"):
            raise self.error(
                entry.line, f"panel names may not start with 'group'/'rigid_group': {prefix!r}"
            )
        if prefix not in self.panels:
            self.panels[prefix] = {}
            self.panel_defaults[prefix] = dict(self.defaults)  # defaults of panels mentioned later
        self.panels[prefix][sub] = entry

    def _global(self, key: str, entry: _Entry) -> None:
        key = _MASK0_ALIASES.get(key, key)
        for prefix, table in (
            ("rigid_group_collection_", self.collections),
            ("rigid_group_", self.rigid_groups),
            ("group_", self.groups),
        ):
            if key.startswith(prefix):
                members = [m.strip() for m in entry.value.split(",") if m.strip()]
                table[key[len(prefix) :]] = members
                return
        if key in ("photon_energy", "wavelength", "peak_list", "peak_list_type", "clen"):
            self.globals[key] = entry
        elif key in _PANEL_KEYS or re.fullmatch(r"dim\d+", key) or _KNOWN_PANEL_EXTRA.match(key):
            self.defaults[key] = entry
        elif key in _KNOWN_GLOBAL_EXTRA:
            self.extra[key] = entry.value
        else:
            log.warning(
                "%s line %d: unknown geometry key %r kept, not used",
                self.source or "<geometry>",
                entry.line,
                key,
            )
            self.extra[key] = entry.value

    # --- groups ---------------------------------------------------------------------------
    def _group_members(self, name: str, seen=()) -> list[str]:
        members = self.groups.get(name) or self.rigid_groups.get(name) or self.collections.get(name)
        if members is None or name in seen:
            return [name]
        out = []
        for m in members:
            out.extend(self._group_members(m, seen + (name,)))
        return out

    def _merged_panels(self) -> dict[str, dict[str, _Entry]]:
        """Each panel's keys: global defaults < group keys (``q0/res = ...``) < its own keys.

        A prefix that names a group (rigid_group_q0, group_q0, a collection) and has no pixel
        ranges of its own is a group default, not a panel.
        """
        known = set(self.groups) | set(self.rigid_groups) | set(self.collections)
        group_prefixes = [p for p in self.panels if p in known and "min_fs" not in self.panels[p]]
        from_groups: dict[str, dict[str, _Entry]] = {}
        for group in group_prefixes:
            for member in self._group_members(group):
                from_groups.setdefault(member, {}).update(self.panels[group])
        return {
            name: {**self.panel_defaults[name], **from_groups.get(name, {}), **own}
            for name, own in self.panels.items()
            if name not in group_prefixes
        }

    # --- panels ---------------------------------------------------------------------------
    def _build_panels(self) -> list[Panel]:
        if not self.panels:
            raise self.error(None, "no panels defined")
        global_clen = self.globals.get("clen")
        self.clen_scale: Optional[float] = None
        panels = []
        for name, keys in self._merged_panels().items():
            if "clen" not in keys and global_clen is not None:
                keys["clen"] = global_clen
            panels.append(self._build_panel(name, keys))
        return panels

    def _build_panel(self, name: str, keys: dict[str, _Entry]) -> Panel:
        for key in _REQUIRED:
            if key not in keys:
                raise self.error(None, f"missing required key {key!r}", f"panel {name} {key}")
        kwargs: dict = {"name": name, "dims": {}, "extra": {}}
        for key, entry in keys.items():
            self._panel_key(name, key, entry, kwargs)
        for lo, hi in (("min_fs", "max_fs"), ("min_ss", "max_ss")):
            if kwargs[hi] < kwargs[lo]:
                raise self.error(
                    keys[hi].line, f"panel {name}: {hi} = {kwargs[hi]} < {lo} = {kwargs[lo]}"
                )
        if kwargs["res"] <= 0:
            raise self.error(keys["res"].line, f"panel {name}: res must be > 0 (pixels per metre)")
        return Panel(**kwargs)

    def _panel_key(self, name: str, key: str, entry: _Entry, kwargs: dict) -> None:
        if key.startswith("dim") and key[3:].isdigit():
            kwargs["dims"][int(key[3:])] = entry.value
            return
        if key not in _PANEL_KEYS:
            if not _KNOWN_PANEL_EXTRA.match(key):
                log.warning(
                    "%s line %d: unknown panel key %r for %s kept, not used",
                    self.source or "<geometry>",
                    entry.line,
                    key,
                    name,
                )
            kwargs["extra"][key] = entry.value
            return
        try:
            value = _convert_panel_value(key, entry.value)
        except _Bad as exc:
            raise self.error(entry.line, f"{name}/{key}: {exc}") from None
        if key == "clen":
            value, factor = value
            if factor is not None:
                self.clen_scale = factor
        kwargs[key] = value

    def _build_bad(self, name: str, keys: dict[str, _Entry]) -> BadRegion:
        xy = {"min_x", "max_x", "min_y", "max_y"}
        fsss = {"min_fs", "max_fs", "min_ss", "max_ss"}
        present = set(keys)
        line = min(e.line for e in keys.values())
        unknown = present - xy - fsss - {"panel"}
        if unknown:
            raise self.error(
                keys[sorted(unknown)[0]].line,
                f"bad region {name}: unknown key {sorted(unknown)[0]!r}",
            )
        if present & xy and present & fsss:
            raise self.error(line, f"bad region {name} mixes x/y and fs/ss limits")
        need = xy if present & xy else fsss | {"panel"}
        missing = need - present
        if missing:
            raise self.error(line, f"bad region {name} lacks {sorted(missing)}")
        region = BadRegion(name)
        for key, entry in keys.items():
            try:
                value = (
                    entry.value
                    if key == "panel"
                    else (_number(entry.value) if key in xy else _integer(entry.value))
                )
            except _Bad as exc:
                raise self.error(entry.line, f"{name}/{key}: {exc}") from None
            setattr(region, key, value)
        lo_hi = (
            (("min_x", "max_x"), ("min_y", "max_y"))
            if region.kind == "xy"
            else (("min_fs", "max_fs"), ("min_ss", "max_ss"))
        )
        for lo, hi in lo_hi:
            if getattr(region, hi) < getattr(region, lo):
                raise self.error(keys[hi].line, f"bad region {name}: {hi} < {lo}")
        return region

    # --- global values --------------------------------------------------------------------
    def _photon_energy(self) -> tuple[Union[float, str, None], float]:
        if "photon_energy" in self.globals:
            entry = self.globals["photon_energy"]
            try:
                value, factor = _number_or_path(
                    entry.value, {"eV": 1.0, "keV": 1e3}, "photon_energy"
                )
            except _Bad as exc:
                raise self.error(entry.line, str(exc)) from None
            factor = 1.0 if factor is None else factor
            if isinstance(value, str):
                return value, factor
            if value <= 0:
                raise self.error(entry.line, "photon_energy must be > 0")
            return value * factor, 1.0
        if "wavelength" in self.globals:
            entry = self.globals["wavelength"]
            try:
                value, factor = _number_or_path(entry.value, {"m": 1.0, "A": 1e-10}, "wavelength")
            except _Bad as exc:
                raise self.error(entry.line, str(exc)) from None
            if isinstance(value, str):
                log.warning(
                    "%s: wavelength from data path %s: pass photon_energy_eV explicitly",
                    self.source or "<geometry>",
                    value,
                )
                self.extra["wavelength"] = entry.value
                return None, 1.0
            if value <= 0:
                raise self.error(entry.line, "wavelength must be > 0")
            return HC_EV_NM / (value * (1.0 if factor is None else factor) * 1e9), 1.0
        return None, 1.0

    def _build_geometry(self, panels, bad, module_shape) -> "Geometry":
        energy, energy_scale = self._photon_energy()
        names = {p.name for p in panels}
        for region in bad:
            if region.panel is not None and region.panel not in names:
                raise self.error(
                    self.bad[region.name]["panel"].line,
                    f"bad region {region.name} names unknown panel {region.panel!r}",
                )
        get = lambda k: self.globals[k].value if k in self.globals else None  # noqa: E731
        return Geometry(
            panels=panels,
            bad_regions=bad,
            photon_energy=energy,
            photon_energy_scale=energy_scale,
            clen_scale=1e-3 if self.clen_scale is None else self.clen_scale,
            peak_list=get("peak_list"),
            peak_list_type=get("peak_list_type"),
            rigid_groups=self.rigid_groups,
            rigid_group_collections=self.collections,
            groups=self.groups,
            extra=self.extra,
            source=self.source,
            module_shape=module_shape,
        )


def _read_source(path_or_text) -> tuple[str, Optional[str]]:
    """(text, source path or None) from a Path, a str path, or geometry text."""
    if isinstance(path_or_text, str) and (
        "\n" in path_or_text or ("=" in path_or_text and not os.path.exists(path_or_text))
    ):
        return path_or_text, None
    path = os.fspath(path_or_text)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(), path
    except OSError as exc:
        raise GeometryError(
            path, None, f"cannot read geometry file: {exc.strerror or exc}"
        ) from None


def parse_geometry(path_or_text, *, module_shape: Optional[tuple] = None) -> "Geometry":
    """Parse a CrystFEL geometry from a Path, a str path, or the geometry text itself.

    module_shape: force the (H, W) of stack modules (default: inferred, see module docstring).
    Raises :class:`peaknet.errors.GeometryError` naming the file and ``line N`` (or
    ``panel NAME KEY``) for malformed input. Unknown keys are kept with a logged warning.
    """
    text, source = _read_source(path_or_text)
    return _Parser(text, source).run(module_shape)


# ============================================================================================
# layout: slab <-> stack
# ============================================================================================
@dataclass
class _Layout:
    slab_shape: tuple
    module_origin: np.ndarray  # (P, 2) slab (ss, fs) of each module's pixel (0, 0)
    module_shape: Optional[tuple]  # (H, W) or None when panels cannot form a stack
    panel_module: np.ndarray  # (n,) module of each raw panel
    panel_offset: np.ndarray  # (n, 2) (ss, fs) of each raw panel inside its module
    why_no_stack: str = ""


def _check_slab_overlaps(panels: list[Panel], source) -> None:
    """Raise if two panels of the same data array share a pixel."""
    keys = [p.layout_key for p in panels]
    r = np.array([[p.min_ss, p.max_ss, p.min_fs, p.max_fs] for p in panels])
    for i in range(len(panels) - 1):
        j = np.arange(i + 1, len(panels))
        hit = (
            (r[j, 0] <= r[i, 1])
            & (r[i, 0] <= r[j, 1])
            & (r[j, 2] <= r[i, 3])
            & (r[i, 2] <= r[j, 3])
        )
        for k in j[hit]:
            if keys[k] == keys[i]:
                raise GeometryError(
                    source,
                    f"panel {panels[k].name}",
                    f"panels {panels[i].name} and {panels[k].name} overlap in the data array",
                )


def _no_stack(slab: tuple, n: int, why: str) -> _Layout:
    empty = np.zeros((0, 2), np.int64)
    return _Layout(slab, empty, None, np.full(n, -1), np.zeros((n, 2), np.int64),
                   f"{why}: no (P, H, W) stack")


def _group_by_grid(panels: list[Panel], shape: tuple) -> Optional[list[list[int]]]:
    """Group panels into the cells of an (H, W) grid of the slab; None unless they tile it."""
    h, w = shape
    cells: dict[tuple, list[int]] = {}
    for i, p in enumerate(panels):
        cell = (p.min_ss // h, p.min_fs // w)
        if (p.max_ss // h, p.max_fs // w) != cell:
            return None
        cells.setdefault(cell, []).append(i)
    for members in cells.values():
        if sum(panels[i].height * panels[i].width for i in members) != h * w:
            return None
    return list(cells.values())  # dicts keep first-mention order


def _make_layout(panels: list[Panel], module_shape: Optional[tuple], source) -> _Layout:
    """Group raw panels into stack modules (see the module docstring)."""
    n = len(panels)
    keys = list(dict.fromkeys(p.layout_key for p in panels))
    if len(keys) > 1:
        return _layout_per_dataset(panels, keys, source)
    slab = (max(p.max_ss for p in panels) + 1, max(p.max_fs for p in panels) + 1)
    shapes = {p.shape for p in panels}
    single = next(iter(shapes)) if len(shapes) == 1 else None
    target = tuple(int(v) for v in module_shape) if module_shape else None
    if target is None and single in ASIC_MODULE_SHAPES:
        if _group_by_grid(panels, ASIC_MODULE_SHAPES[single]) is not None:
            target = ASIC_MODULE_SHAPES[single]
    if target is None or target == single:
        if single is None:
            return _no_stack(slab, n, f"panels have different shapes {sorted(shapes)}")
        return _layout_from_groups(panels, [[i] for i in range(n)], single, slab)
    groups = _group_by_grid(panels, target)
    if groups is None:
        raise GeometryError(source, None, f"panels do not tile modules of shape {target}")
    return _layout_from_groups(panels, groups, target, slab)


def _layout_from_groups(panels, groups, shape, slab) -> _Layout:
    origin = np.array(
        [[min(panels[i].min_ss for i in g), min(panels[i].min_fs for i in g)] for g in groups]
    )
    module = np.empty(len(panels), np.int64)
    offset = np.empty((len(panels), 2), np.int64)
    for m, g in enumerate(groups):
        for i in g:
            module[i] = m
            offset[i] = (panels[i].min_ss - origin[m, 0], panels[i].min_fs - origin[m, 1])
    return _Layout(slab, origin.astype(np.int64), tuple(shape), module, offset)


def _layout_per_dataset(panels, keys, source) -> _Layout:
    """Panels in several datasets / fixed dims (e.g. AGIPD ``dim1 = 3``): one module per data
    array, stacked vertically into a virtual slab of shape (P * H, W)."""
    groups = [[i for i, p in enumerate(panels) if p.layout_key == k] for k in keys]
    boxes = [
        (
            min(panels[i].min_ss for i in g),
            min(panels[i].min_fs for i in g),
            max(panels[i].max_ss for i in g),
            max(panels[i].max_fs for i in g),
        )
        for g in groups
    ]
    shapes = {(b[2] - b[0] + 1, b[3] - b[1] + 1) for b in boxes}
    n = len(panels)
    if len(shapes) != 1:
        return _no_stack((0, 0), n, "the data arrays of the panels have different shapes")
    h, w = next(iter(shapes))
    module = np.empty(n, np.int64)
    offset = np.empty((n, 2), np.int64)
    for m, (g, b) in enumerate(zip(groups, boxes)):
        for i in g:
            module[i] = m
            offset[i] = (panels[i].min_ss - b[0], panels[i].min_fs - b[1])
    origin = np.array([[m * h, 0] for m in range(len(groups))], np.int64)
    return _Layout((len(groups) * h, w), origin, (h, w), module, offset)


# ============================================================================================
# Geometry
# ============================================================================================
def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _as_points(*arrays):
    out = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in arrays])
    return [a.reshape(-1) for a in out], out[0].shape


@dataclass
class Geometry:
    """A detector geometry: raw panels, their grouping into stack modules, and lab positions.

    photon_energy: eV (float), a data path (str), or None. photon_energy_scale: eV per unit of
    a value read at that path (1000 for ``keV``). clen_scale: metres per unit of a value read
    at a clen data path (CrystFEL default: mm -> 1e-3). Groups are kept for reference.
    Treat instances as immutable (maps are cached): derive changed copies with
    :meth:`with_values` or ``dataclasses.replace``.
    """

    panels: list
    bad_regions: list = field(default_factory=list)
    photon_energy: Union[float, str, None] = None
    photon_energy_scale: float = 1.0
    clen_scale: float = 1e-3
    peak_list: Optional[str] = None
    peak_list_type: Optional[str] = None
    rigid_groups: dict = field(default_factory=dict)
    rigid_group_collections: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    source: Optional[str] = None
    module_shape: Optional[tuple] = None
    _layout: _Layout = field(init=False, repr=False, compare=False)
    _cache: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self):
        if _is_number(self.photon_energy):
            self.photon_energy = float(self.photon_energy)
        if not self.panels:
            raise GeometryError(self.source, None, "no panels defined")
        names = [p.name for p in self.panels]
        if len(set(names)) != len(names):
            raise GeometryError(self.source, None, "duplicate panel names")
        self._validate_panels()
        _check_slab_overlaps(self.panels, self.source)
        self._layout = _make_layout(self.panels, self.module_shape, self.source)

    def __repr__(self) -> str:
        try:
            layout = f"stack={self.stack_shape}"
        except GeometryError:
            layout = "no stack"
        return (
            f"Geometry({len(self.panels)} panels, slab={self.slab_shape}, {layout}, "
            f"clen={self.panels[0].clen!r}, photon_energy={self.photon_energy!r}, "
            f"source={self.source!r})"
        )

    def _validate_panels(self) -> None:
        for p in self.panels:
            for lo, hi in (("min_fs", "max_fs"), ("min_ss", "max_ss")):
                if not 0 <= getattr(p, lo) <= getattr(p, hi):
                    raise GeometryError(
                        self.source,
                        f"panel {p.name} {hi}",
                        f"need 0 <= {lo} <= {hi}, got {getattr(p, lo)}..{getattr(p, hi)}",
                    )
            if not p.res > 0:
                raise GeometryError(self.source, f"panel {p.name} res", "res must be > 0")
            if np.linalg.norm(np.cross(p.fs, p.ss)) < 1e-6:
                raise GeometryError(self.source, f"panel {p.name} fs", "fs and ss are parallel")

    # --- construction / io ----------------------------------------------------------------
    @classmethod
    def from_file(cls, path, *, module_shape: Optional[tuple] = None) -> "Geometry":
        """Parse a ``.geom`` file (see :func:`parse_geometry`)."""
        return parse_geometry(Path(path), module_shape=module_shape)

    def to_text(self) -> str:
        """The geometry as CrystFEL ``.geom`` text (see :func:`write_geometry`)."""
        return geometry_to_text(self)

    def with_values(
        self, *, clen: Optional[float] = None, photon_energy_eV: Optional[float] = None
    ) -> "Geometry":
        """A copy with numeric camera length (m, all panels) and/or photon energy (eV)."""
        panels = self.panels
        if clen is not None:
            panels = [dataclasses.replace(p, clen=float(clen)) for p in panels]
        if photon_energy_eV is None:
            return dataclasses.replace(self, panels=panels)
        return dataclasses.replace(
            self, panels=panels, photon_energy=float(photon_energy_eV), photon_energy_scale=1.0
        )

    # --- scalar values --------------------------------------------------------------------
    @property
    def photon_energy_eV(self) -> Optional[float]:
        """Photon energy in eV, or None when unset or given as a data path."""
        return self.photon_energy if isinstance(self.photon_energy, float) else None

    @property
    def clen(self) -> Union[float, str, None]:
        """Camera length shared by all panels: metres (float), a data path (str), or None.

        Raises GeometryError when panels have different clen values.
        """
        values = {p.clen for p in self.panels}
        if len(values) > 1:
            raise GeometryError(
                self.source, "clen", f"panels have different clen values {sorted(map(str, values))}"
            )
        return next(iter(values))

    def clen_from_file_value(self, value: float) -> float:
        """Metres from a value read at the clen data path (CrystFEL: mm unless 'm' given)."""
        return float(value) * self.clen_scale

    def photon_energy_from_file_value(self, value: float) -> float:
        """eV from a value read at the photon_energy data path."""
        return float(value) * self.photon_energy_scale

    @property
    def dims(self) -> dict:
        """Data-array dimension roles of the first panel, e.g. {0: '%', 1: 'ss', 2: 'fs'}."""
        return dict(self.panels[0].dims)

    @property
    def data(self) -> Optional[str]:
        """Data location of the first panel (``data = ...``), or None."""
        return self.panels[0].data

    # --- layout ---------------------------------------------------------------------------
    @property
    def panel_names(self) -> list[str]:
        return [p.name for p in self.panels]

    def panel_index(self, name: str) -> int:
        """Index of the raw panel called ``name`` (KeyError if unknown)."""
        index = self._cache.get("names")
        if index is None:
            index = self._cache["names"] = {p.name: i for i, p in enumerate(self.panels)}
        return index[name]

    @property
    def slab_shape(self) -> tuple[int, int]:
        """(ss, fs) shape of the data array that holds all panels."""
        return tuple(int(v) for v in self._layout.slab_shape)

    def _need_stack(self) -> _Layout:
        if self._layout.module_shape is None:
            raise GeometryError(self.source, None, self._layout.why_no_stack)
        return self._layout

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        """(P, H, W): modules, rows (ss), columns (fs) of the stack layout."""
        lay = self._need_stack()
        return (len(lay.module_origin), *lay.module_shape)

    @property
    def n_modules(self) -> int:
        return self.stack_shape[0]

    @property
    def module_of_panel(self) -> np.ndarray:
        """(n_panels,) int: stack module of each raw panel (``geom.panels`` order)."""
        return self._need_stack().panel_module.copy()

    @property
    def panel_offsets(self) -> np.ndarray:
        """(n_panels, 2) int: (ss, fs) of each raw panel's first pixel inside its module."""
        return self._need_stack().panel_offset.copy()

    @property
    def module_origins(self) -> np.ndarray:
        """(P, 2) int: slab (ss, fs) of each module's pixel (0, 0)."""
        return self._need_stack().module_origin.copy()

    @property
    def module_panels(self) -> list[list[int]]:
        """Raw panel indices of each module."""
        mod = self._need_stack().panel_module
        return [list(np.flatnonzero(mod == m)) for m in range(self.n_modules)]

    def _check_trailing(self, arr: np.ndarray, shape: tuple, what: str) -> None:
        if arr.ndim < len(shape) or arr.shape[-len(shape) :] != tuple(shape):
            raise ValueError(
                f"expected {what} array with trailing shape {tuple(shape)}, got {arr.shape}"
            )

    def slab_to_stack(self, arr) -> np.ndarray:
        """(..., SS, FS) slab array -> (..., P, H, W) stack (a copy)."""
        arr = np.asarray(arr)
        self._check_trailing(arr, self.slab_shape, "slab")
        lay = self._need_stack()
        h, w = lay.module_shape
        return np.stack([arr[..., s : s + h, f : f + w] for s, f in lay.module_origin], axis=-3)

    def stack_to_slab(self, arr, fill=0) -> np.ndarray:
        """(..., P, H, W) stack -> (..., SS, FS) slab; pixels outside modules get ``fill``."""
        arr = np.asarray(arr)
        self._check_trailing(arr, self.stack_shape, "stack")
        lay = self._need_stack()
        h, w = lay.module_shape
        out = np.full(arr.shape[:-3] + self.slab_shape, fill, dtype=arr.dtype)
        for m, (s, f) in enumerate(lay.module_origin):
            out[..., s : s + h, f : f + w] = arr[..., m, :, :]
        return out

    def stack_to_slab_coords(self, panel, ss, fs) -> tuple[np.ndarray, np.ndarray]:
        """Module coordinates (panel = module index, ss, fs; pixel centres) -> slab (ss, fs).

        ValueError for a module index outside 0..P-1.
        """
        origin = self._need_stack().module_origin
        p = np.asarray(panel, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= len(origin)):
            raise ValueError(f"module index out of range 0..{len(origin) - 1}")
        return np.asarray(ss) + origin[p, 0], np.asarray(fs) + origin[p, 1]

    def slab_module_map(self) -> np.ndarray:
        """(SS, FS) int32: module index of each slab pixel, -1 outside all modules."""
        if "slab_module" not in self._cache:
            lay = self._need_stack()
            out = np.full(self.slab_shape, -1, np.int32)
            h, w = lay.module_shape
            for m, (s, f) in enumerate(lay.module_origin):
                out[s : s + h, f : f + w] = m
            self._cache["slab_module"] = out
        return self._cache["slab_module"]

    def slab_panel_map(self) -> np.ndarray:
        """(SS, FS) int32: raw panel index of each slab pixel, -1 where no panel."""
        if "slab_panel" not in self._cache:
            out = np.full(self.slab_shape, -1, np.int32)
            for i, (s, f) in enumerate(self._panel_slab_origin()):
                h, w = self.panels[i].shape
                out[s : s + h, f : f + w] = i
            self._cache["slab_panel"] = out
        return self._cache["slab_panel"]

    def _panel_slab_origin(self) -> np.ndarray:
        """(n, 2) slab (ss, fs) of each panel's first pixel (= min_ss, min_fs for one dataset)."""
        lay = self._layout
        if lay.module_shape is None:
            return np.array([[p.min_ss, p.min_fs] for p in self.panels])
        return lay.module_origin[lay.panel_module] + lay.panel_offset

    @staticmethod
    def _pixel_of(ss, fs, shape):
        """Integer pixel containing each point (centre convention) and an in-range flag."""
        fss, ffs = np.floor(ss + 0.5), np.floor(fs + 0.5)
        ok = np.isfinite(fss) & np.isfinite(ffs) & (fss >= 0) & (ffs >= 0)
        ok &= (fss < shape[0]) & (ffs < shape[1])
        return np.where(ok, fss, 0).astype(np.int64), np.where(ok, ffs, 0).astype(np.int64), ok

    def slab_to_stack_coords(self, ss, fs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slab (ss, fs) pixel-centre coordinates -> (module, ss, fs) in module coordinates.

        The module is the one containing pixel ``floor(x + 0.5)``; points outside every module
        give module -1 and NaN coordinates.
        """
        (ss, fs), shape = _as_points(ss, fs)
        iss, ifs, ok = self._pixel_of(ss, fs, self.slab_shape)
        module = np.where(ok, self.slab_module_map()[iss, ifs], -1)
        origin = self._need_stack().module_origin
        good = module >= 0
        lss = np.where(good, ss - origin[np.maximum(module, 0), 0], np.nan)
        lfs = np.where(good, fs - origin[np.maximum(module, 0), 1], np.nan)
        return module.reshape(shape).astype(np.int32), lss.reshape(shape), lfs.reshape(shape)

    def slab_to_stack_coords_by_name(self, panel_names: Sequence[str], ss, fs):
        """Like :meth:`slab_to_stack_coords` but each point belongs to the named raw panel
        (as in stream files); KeyError for an unknown name."""
        idx = np.array([self.panel_index(n) for n in panel_names], dtype=np.int64)
        (ss, fs), shape = _as_points(ss, fs)
        lay = self._need_stack()
        origin = lay.module_origin[lay.panel_module[idx]]
        module = lay.panel_module[idx].astype(np.int32)
        return (
            module.reshape(shape),
            (ss - origin[:, 0]).reshape(shape),
            (fs - origin[:, 1]).reshape(shape),
        )

    def raw_panel_at_slab(self, ss, fs) -> np.ndarray:
        """Raw panel index (``geom.panels``) containing each slab point, -1 where none."""
        (ss, fs), shape = _as_points(ss, fs)
        iss, ifs, ok = self._pixel_of(ss, fs, self.slab_shape)
        return np.where(ok, self.slab_panel_map()[iss, ifs], -1).reshape(shape)

    def module_panel_map(self) -> np.ndarray:
        """(P, H, W) int32: raw panel index of each stack pixel, -1 where no panel."""
        if "module_panel" not in self._cache:
            self._cache["module_panel"] = self.slab_to_stack(self.slab_panel_map())
        return self._cache["module_panel"]

    # --- lab positions ----------------------------------------------------------------------
    def _panel_arrays(self) -> dict:
        if "arrays" not in self._cache:
            p = self.panels
            self._cache["arrays"] = {
                "fs": np.array([q.fs for q in p], np.float64),
                "ss": np.array([q.ss for q in p], np.float64),
                "corner": np.array([[q.corner_x, q.corner_y, 0.0] for q in p], np.float64),
                "res": np.array([q.res for q in p], np.float64),
                "coffset": np.array([q.coffset for q in p], np.float64),
                "shape": np.array([q.shape for q in p], np.int64),
            }
        return self._cache["arrays"]

    def _clen_array(self, clen: Optional[float]) -> np.ndarray:
        """(n,) camera length in metres for each panel."""
        if clen is not None:
            return np.full(len(self.panels), float(clen))
        out = []
        for p in self.panels:
            if not _is_number(p.clen):
                problem = (
                    "clen is not set"
                    if p.clen is None
                    else f"clen is the data path {p.clen!r}; pass clen= in metres "
                    f"(values at that path are in {self.clen_scale:g} m units)"
                )
                raise GeometryError(self.source, f"panel {p.name} clen", problem)
            out.append(float(p.clen))
        return np.array(out)

    def _energy(self, photon_energy_eV: Optional[float]) -> float:
        energy = self.photon_energy_eV if photon_energy_eV is None else float(photon_energy_eV)
        if energy is None or not energy > 0:
            what = (
                f"photon_energy is the data path {self.photon_energy!r}"
                if isinstance(self.photon_energy, str)
                else "photon_energy is not set"
            )
            raise GeometryError(self.source, "photon_energy", f"{what}; pass photon_energy_eV=")
        return energy

    def _panel_pixels_px(self, i: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Lab (x, y, z-without-clen) in pixels of panel corner coordinates (a = fs, b = ss)."""
        arr = self._panel_arrays()
        return arr["corner"][i] + a[..., None] * arr["fs"][i] + b[..., None] * arr["ss"][i]

    def _panel_grid_px(self, i: int) -> np.ndarray:
        """(h, w, 3) lab (x, y, z-without-clen) in pixels of the pixel centres of raw panel i."""
        h, w = self.panels[i].shape
        b, a = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        return self._panel_pixels_px(i, a, b)

    def _panel_block_m(self, i: int, clen_i: float) -> np.ndarray:
        """(h, w, 3) lab positions in metres of all pixel centres of raw panel i."""
        pos = self._panel_grid_px(i) / self.panels[i].res
        pos[..., 2] += clen_i + self.panels[i].coffset
        return pos

    def _fill_stack(self, per_panel, depth: int, fill=np.nan) -> np.ndarray:
        """Place per-panel (h, w, depth) blocks into a (P, H, W, depth) stack."""
        lay = self._need_stack()
        out = np.full(self.stack_shape + (depth,), fill, np.float64)
        for i, p in enumerate(self.panels):
            m, (s, f) = lay.panel_module[i], lay.panel_offset[i]
            out[m, s : s + p.height, f : f + p.width] = per_panel(i)
        return out

    def pixel_positions(self, clen: Optional[float] = None) -> np.ndarray:
        """(P, H, W, 3) float64 lab (x, y, z) of every pixel centre in metres (NaN off-panel).

        z = clen + coffset (+ tilt). clen: metres, overriding the file's value (needed when
        the geometry's clen is a data path).
        """
        clens = self._clen_array(clen)
        return self._fill_stack(lambda i: self._panel_block_m(i, clens[i]), 3)

    def lab_positions(self, panel, ss, fs, clen: Optional[float] = None) -> np.ndarray:
        """(N, 3) lab positions in metres of module coordinates (module, ss, fs; pixel centres,
        sub-pixel allowed). Points off every raw panel give NaN."""
        (p, ss, fs), shape = _as_points(panel, ss, fs)
        raw = self._raw_panel_at_module(p.astype(np.int64), ss, fs)
        clens = self._clen_array(clen)
        arr = self._panel_arrays()
        r = np.maximum(raw, 0)
        off = self._layout.panel_offset[r]
        a = fs - off[:, 1] + 0.5
        b = ss - off[:, 0] + 0.5
        px = arr["corner"][r] + a[:, None] * arr["fs"][r] + b[:, None] * arr["ss"][r]
        pos = px / arr["res"][r, None]
        pos[:, 2] += clens[r] + arr["coffset"][r]
        pos[raw < 0] = np.nan
        return pos.reshape(shape + (3,))

    def _raw_panel_at_module(self, module, ss, fs) -> np.ndarray:
        P, H, W = self.stack_shape
        iss, ifs, ok = self._pixel_of(ss, fs, (H, W))
        ok &= (module >= 0) & (module < P)
        return np.where(ok, self.module_panel_map()[np.where(ok, module, 0), iss, ifs], -1)

    def radius_map(self) -> np.ndarray:
        """(P, H, W) distance of each pixel centre from the beam axis, in pixels (NaN off-panel).

        Uses the lab x, y of the pixel in units of its panel's pixel size (no clen needed).
        """

        def block(i):
            px = self._panel_grid_px(i)
            return np.hypot(px[..., 0], px[..., 1])[..., None]

        return self._fill_stack(block, 1)[..., 0]

    def two_theta_map(self, clen: Optional[float] = None) -> np.ndarray:
        """(P, H, W) scattering angle 2 theta in radians between the beam and each pixel."""
        pos = self.pixel_positions(clen)
        return np.arctan2(np.hypot(pos[..., 0], pos[..., 1]), pos[..., 2])

    def resolution_map(
        self, photon_energy_eV: Optional[float] = None, clen: Optional[float] = None
    ) -> np.ndarray:
        """(P, H, W) resolution 1/d in nm^-1 at each pixel: 1/d = 2 sin(theta) / lambda."""
        wavelength_nm = HC_EV_NM / self._energy(photon_energy_eV)
        return 2.0 * np.sin(0.5 * self.two_theta_map(clen)) / wavelength_nm

    def resolution_at(
        self, panel, ss, fs, photon_energy_eV: Optional[float] = None, clen: Optional[float] = None
    ) -> np.ndarray:
        """1/d in nm^-1 at module coordinates (module, ss, fs), sub-pixel; NaN off-panel."""
        pos = self.lab_positions(panel, ss, fs, clen)
        two_theta = np.arctan2(np.hypot(pos[..., 0], pos[..., 1]), pos[..., 2])
        return 2.0 * np.sin(0.5 * two_theta) / (HC_EV_NM / self._energy(photon_energy_eV))

    # --- masks ----------------------------------------------------------------------------
    def good_pixel_mask(self) -> np.ndarray:
        """(P, H, W) bool: True for pixels on a panel, outside bad regions, on panels without
        ``no_index``, and not within ``mask_edge_pixels`` of a panel edge."""
        mask = self.slab_to_stack(self._slab_good())
        xy = [r for r in self.bad_regions if r.kind == "xy"]
        if xy:
            mask &= ~self._xy_bad(xy)
        return mask

    def _slab_good(self) -> np.ndarray:
        good = np.zeros(self.slab_shape, bool)
        for i, (s, f) in enumerate(self._panel_slab_origin()):
            p = self.panels[i]
            if p.no_index:
                continue
            e = p.mask_edge_pixels
            good[s + e : s + p.height - e, f + e : f + p.width - e] = True
        names = {p.name: i for i, p in enumerate(self.panels)}
        origin = self._panel_slab_origin()
        for r in self.bad_regions:
            if r.kind == "fsss":
                p = self.panels[names[r.panel]]
                s0, f0 = origin[names[r.panel]] - (p.min_ss, p.min_fs)
                ss = slice(max(r.min_ss, p.min_ss) + s0, min(r.max_ss, p.max_ss) + s0 + 1)
                fs = slice(max(r.min_fs, p.min_fs) + f0, min(r.max_fs, p.max_fs) + f0 + 1)
                good[ss, fs] = False
        return good

    def _xy_bad(self, regions) -> np.ndarray:
        def block(i):
            return self._panel_grid_px(i)[..., :2]

        xy = self._fill_stack(block, 2)
        bad = np.zeros(xy.shape[:-1], bool)
        for r in regions:
            bad |= (
                (xy[..., 0] >= r.min_x)
                & (xy[..., 0] <= r.max_x)
                & (xy[..., 1] >= r.min_y)
                & (xy[..., 1] <= r.max_y)
            )
        return bad

    # --- assembled images -------------------------------------------------------------------
    def assembly_index(self, pixel_size: Optional[float] = None) -> AssemblyIndex:
        """Integer image indices for :meth:`assemble` (cached per pixel size).

        pixel_size: image pixel in metres (default: the smallest panel pixel, 1 / max(res)).
        Positions are projected along the beam (lab x, y); the beam axis falls on pixel
        ``index.beam`` exactly.
        """
        ps = float(pixel_size) if pixel_size else 1.0 / max(p.res for p in self.panels)
        key = ("assembly", ps)
        if key in self._cache:
            return self._cache[key]

        def block(i):
            return self._panel_grid_px(i)[..., :2] / self.panels[i].res

        xy = self._fill_stack(block, 2)
        on = np.isfinite(xy[..., 0])
        col = np.where(on, np.rint(np.where(on, xy[..., 0], 0) / ps), 0).astype(np.int64)
        row = np.where(on, np.rint(-np.where(on, xy[..., 1], 0) / ps), 0).astype(np.int64)
        r0, c0 = -min(row[on].min(), 0), -min(col[on].min(), 0)
        rows, cols = np.where(on, row + r0, -1), np.where(on, col + c0, -1)
        shape = (int(max(rows.max(), r0) + 1), int(max(cols.max(), c0) + 1))
        index = AssemblyIndex(rows, cols, shape, (int(r0), int(c0)), ps)
        self._cache[key] = index
        return index

    def assemble(self, stack, pixel_size: Optional[float] = None, fill=np.nan):
        """Place a (..., P, H, W) stack into a 2-D image as seen along the beam.

        Returns (image (..., R, C), :class:`AssemblyIndex`). The beam axis is at pixel
        ``index.beam``; gaps hold ``fill``. The image dtype can hold both data and ``fill``.
        """
        stack = np.asarray(stack)
        self._check_trailing(stack, self.stack_shape, "stack")
        index = self.assembly_index(pixel_size)
        dtype = np.result_type(stack.dtype, fill)  # Python scalars are weak: int32 + -1 -> int32
        out = np.full(stack.shape[:-3] + index.shape, fill, dtype=dtype)
        on = index.rows >= 0
        out[..., index.rows[on], index.cols[on]] = stack[..., on]
        return out, index

    # --- ray projection ---------------------------------------------------------------------
    def project(self, directions, clen: Optional[float] = None):
        """Where rays from the sample hit the detector.

        directions: (N, 3) lab direction vectors (any length). Each ray is intersected with
        every panel plane (exact for tilted panels); the nearest hit inside a panel wins.
        Returns (panel, ss, fs, valid): module index (int32, -1 if missed), module-local
        pixel-centre coordinates (float64, NaN if missed) and a bool hit flag, each (N,).
        """
        d = np.asarray(directions, np.float64).reshape(-1, 3)
        planes = self._panel_planes(self._clen_array(clen))
        n = len(d)
        panel = np.full(n, -1, np.int32)
        ss = np.full(n, np.nan)
        fs = np.full(n, np.nan)
        chunk = max(1, 500_000 // len(self.panels))  # bounds the (rays, panels) arrays
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            panel[sl], ss[sl], fs[sl] = self._project_chunk(d[sl], planes)
        return panel, ss, fs, panel >= 0

    def _panel_planes(self, clens: np.ndarray) -> dict:
        """Per raw panel: step vectors u (fs), v (ss) in m, the plane normal, the inverse Gram
        matrix of (u, v), and the projections of the first pixel corner O (m) on u, v, normal."""
        arr = self._panel_arrays()
        res = arr["res"][:, None]
        o = arr["corner"] / res
        o[:, 2] += clens + arr["coffset"]
        u, v = arr["fs"] / res, arr["ss"] / res
        normal = np.cross(u, v)
        uu, uv, vv = (u * u).sum(1), (u * v).sum(1), (v * v).sum(1)
        return {
            "u": u,
            "v": v,
            "n": normal,
            "ginv": np.linalg.inv(np.stack([uu, uv, uv, vv], 1).reshape(-1, 2, 2)),
            "ou": (o * u).sum(1),
            "ov": (o * v).sum(1),
            "on": (o * normal).sum(1),
        }

    def _project_chunk(self, d: np.ndarray, pl: dict):
        dn = d @ pl["n"].T  # (N, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = pl["on"] / dn
        ru = t * (d @ pl["u"].T) - pl["ou"]
        rv = t * (d @ pl["v"].T) - pl["ov"]
        g = pl["ginv"]
        a = g[:, 0, 0] * ru + g[:, 0, 1] * rv  # fs, corner convention, panel-local
        b = g[:, 1, 0] * ru + g[:, 1, 1] * rv  # ss
        shape = self._panel_arrays()["shape"]
        inside = (
            np.isfinite(t) & (t > 0) & (a >= 0) & (a < shape[:, 1]) & (b >= 0) & (b < shape[:, 0])
        )
        best = np.argmin(np.where(inside, t, np.inf), axis=1)
        rows = np.arange(len(d))
        hit = inside[rows, best]
        lay = self._need_stack()
        module = np.where(hit, lay.panel_module[best], -1).astype(np.int32)
        off = lay.panel_offset[best]
        ss = np.where(hit, b[rows, best] - 0.5 + off[:, 0], np.nan)
        fs = np.where(hit, a[rows, best] - 0.5 + off[:, 1], np.nan)
        return module, ss, fs


# ============================================================================================
# writing
# ============================================================================================
def _fmt(v: float) -> str:
    return repr(float(v))


def _fmt_vector(v: Vector) -> str:
    terms = [f"{'+' if c >= 0 else ''}{_fmt(c)}{axis}" for c, axis in zip(v, "xyz") if c != 0]
    return " ".join(terms)


def _panel_items(p: Panel, clen_scale: float) -> list[tuple[str, str]]:
    items = [
        ("min_fs", str(p.min_fs)),
        ("max_fs", str(p.max_fs)),
        ("min_ss", str(p.min_ss)),
        ("max_ss", str(p.max_ss)),
        ("fs", _fmt_vector(p.fs)),
        ("ss", _fmt_vector(p.ss)),
        ("corner_x", _fmt(p.corner_x)),
        ("corner_y", _fmt(p.corner_y)),
        ("res", _fmt(p.res)),
        ("coffset", _fmt(p.coffset)),
    ]
    if _is_number(p.clen):
        items.append(("clen", f"{_fmt(p.clen)} m"))
    elif isinstance(p.clen, str):
        items.append(("clen", f"{p.clen} {'m' if clen_scale == 1.0 else 'mm'}"))
    for key in ("adu_per_eV", "adu_per_photon", "max_adu"):
        if getattr(p, key) is not None:
            items.append((key, _fmt(getattr(p, key))))
    for key in ("data", "mask", "mask_file"):
        if getattr(p, key) is not None:
            items.append((key, getattr(p, key)))
    for key in ("mask_good", "mask_bad"):
        if getattr(p, key) is not None:
            items.append((key, hex(getattr(p, key))))
    if p.no_index:
        items.append(("no_index", "1"))
    if p.mask_edge_pixels:
        items.append(("mask_edge_pixels", str(p.mask_edge_pixels)))
    items += [(f"dim{k}", v) for k, v in sorted(p.dims.items())]
    items += list(p.extra.items())
    return items


def geometry_to_text(geom: Geometry) -> str:
    """CrystFEL ``.geom`` text for ``geom``: values shared by all panels are written once at
    the top, the rest per panel. Parsing the text gives an equal Geometry."""
    per_panel = [dict(_panel_items(p, geom.clen_scale)) for p in geom.panels]
    shared = {
        k: v
        for k, v in per_panel[0].items()
        if all(d.get(k) == v for d in per_panel)
        and k not in ("min_fs", "max_fs", "min_ss", "max_ss")
    }
    lines = ["; CrystFEL geometry written by peaknet"]
    if geom.photon_energy is not None:
        value = geom.photon_energy
        unit = "eV" if isinstance(value, float) or geom.photon_energy_scale == 1.0 else "keV"
        lines.append(f"photon_energy = {_fmt(value) if isinstance(value, float) else value} {unit}")
    for key in ("peak_list", "peak_list_type"):
        if getattr(geom, key) is not None:
            lines.append(f"{key} = {getattr(geom, key)}")
    lines += [f"{k} = {v}" for k, v in geom.extra.items()]
    lines += [f"{k} = {v}" for k, v in shared.items()]
    lines.append("")
    for name, table in (
        ("rigid_group_", geom.rigid_groups),
        ("rigid_group_collection_", geom.rigid_group_collections),
        ("group_", geom.groups),
    ):
        lines += [f"{name}{k} = {','.join(v)}" for k, v in table.items()]
    for r in geom.bad_regions:
        keys = (
            ("min_x", "max_x", "min_y", "max_y")
            if r.kind == "xy"
            else ("min_fs", "max_fs", "min_ss", "max_ss", "panel")
        )
        lines += [f"{r.name}/{k} = {getattr(r, k)}" for k in keys] + [""]
    for p, items in zip(geom.panels, per_panel):
        lines += [f"{p.name}/{k} = {v}" for k, v in items.items() if k not in shared] + [""]
    return "\n".join(lines) + "\n"


def write_geometry(geom: Geometry, path) -> None:
    """Write ``geom`` as a CrystFEL ``.geom`` file at ``path``."""
    Path(path).write_text(geometry_to_text(geom), encoding="utf-8")


# ============================================================================================
# shipped geometries
# ============================================================================================
def builtin_geometry_path(name: str) -> Path:
    """Path of a shipped geometry: 'cspad', 'epix10ka2m' or 'jungfrau4m'."""
    if name not in BUILTIN_GEOMETRIES:
        raise KeyError(f"unknown built-in geometry {name!r}; choose from {BUILTIN_GEOMETRIES}")
    return Path(__file__).resolve().parent.parent / "data" / "geometry" / f"{name}.geom"


def load_builtin_geometry(name: str) -> Geometry:
    """Parse a shipped geometry (see :func:`builtin_geometry_path`)."""
    return Geometry.from_file(builtin_geometry_path(name))
