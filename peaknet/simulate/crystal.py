"""Unit cells of the seven crystal systems, the reciprocal lattice and random orientations.

Conventions
-----------
- Lengths in Ångström, angles in degrees (inputs) / radians (internal), reciprocal lengths in
  1/Å **without** the 2π factor: ``|q| = 1/d``.
- Orthogonalisation (the standard PDB/"Busing-Levy" setting): ``a`` along x, ``b`` in the x-y
  plane, ``c*`` along z. :meth:`UnitCell.real_basis` returns the 3x3 matrix ``A`` whose *columns*
  are a, b, c in that Cartesian frame; :meth:`UnitCell.reciprocal_basis` returns ``B = inv(A).T``
  whose columns are a*, b*, c*, so ``q = B @ hkl`` in the crystal's Cartesian frame.
- A crystal orientation ``U`` (3x3 rotation) maps the crystal Cartesian frame to the lab frame,
  ``q_lab = U @ B @ hkl``. Lab frame: CrystFEL's (z along the beam, metres for positions).
- Monoclinic cells use the b-unique setting (alpha = gamma = 90°). Trigonal cells are accepted
  in hexagonal axes (a = b, gamma = 120°) or rhombohedral axes (a = b = c, alpha = beta = gamma).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "SYSTEMS",
    "CENTERINGS",
    "ALLOWED_CENTERINGS",
    "UnitCell",
    "check_cell",
    "d_spacing_formula",
    "systematic_absent",
    "enumerate_hkl",
    "random_rotation",
    "random_rotations",
]

SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")
CENTERINGS = ("P", "A", "B", "C", "I", "F", "R")

#: Bravais lattices (system -> lattice centerings that exist for it).
ALLOWED_CENTERINGS = {
    "triclinic": ("P",),
    "monoclinic": ("P", "C", "A", "I"),
    "orthorhombic": ("P", "C", "A", "B", "I", "F"),
    "tetragonal": ("P", "I"),
    "trigonal": ("P", "R"),
    "hexagonal": ("P",),
    "cubic": ("P", "I", "F"),
}

_LEN_RTOL = 1e-3  # relative tolerance for "a = b" style constraints
_ANG_TOL = 0.01  # degrees, for "alpha = 90" style constraints


@dataclass(frozen=True)
class UnitCell:
    """A unit cell: a, b, c in Å; alpha, beta, gamma in degrees.

    Raises ``ValueError`` if a length is not positive or the angles do not form a cell
    (each in (0, 180), and the three cell edges not coplanar).
    """

    a: float
    b: float
    c: float
    alpha: float = 90.0
    beta: float = 90.0
    gamma: float = 90.0

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"cell length {name} = {v} Å must be positive")
        for name in ("alpha", "beta", "gamma"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and 0.0 < v < 180.0):
                raise ValueError(f"cell angle {name} = {v}° must lie strictly between 0 and 180")
        al, be, ga = (math.radians(x) for x in (self.alpha, self.beta, self.gamma))
        # volume^2 / (abc)^2 must be positive (no degenerate / impossible angle triple)
        v2 = 1 - math.cos(al) ** 2 - math.cos(be) ** 2 - math.cos(ga) ** 2 + 2 * math.cos(al) * math.cos(
            be
        ) * math.cos(ga)
        if v2 <= 1e-12:
            raise ValueError(
                f"cell angles ({self.alpha}, {self.beta}, {self.gamma})° do not form a cell "
                "(each angle must be smaller than the sum of the other two, and their sum < 360°)"
            )

    @classmethod
    def from_sequence(cls, values: Sequence[float]) -> "UnitCell":
        """From (a, b, c, alpha, beta, gamma); three values mean an orthogonal cell."""
        vals = [float(v) for v in values]
        if len(vals) == 3:
            vals += [90.0, 90.0, 90.0]
        if len(vals) != 6:
            raise ValueError(f"a cell needs 6 values (a, b, c, alpha, beta, gamma), got {len(vals)}")
        return cls(*vals)

    def as_tuple(self) -> tuple[float, float, float, float, float, float]:
        return (self.a, self.b, self.c, self.alpha, self.beta, self.gamma)

    @property
    def angles_rad(self) -> tuple[float, float, float]:
        return tuple(math.radians(x) for x in (self.alpha, self.beta, self.gamma))  # type: ignore[return-value]

    def metric_tensor(self) -> np.ndarray:
        """Real-space metric tensor G (3x3, Å²): ``G[i, j] = a_i · a_j``."""
        a, b, c = self.a, self.b, self.c
        al, be, ga = self.angles_rad
        return np.array(
            [
                [a * a, a * b * math.cos(ga), a * c * math.cos(be)],
                [a * b * math.cos(ga), b * b, b * c * math.cos(al)],
                [a * c * math.cos(be), b * c * math.cos(al), c * c],
            ]
        )

    def reciprocal_metric_tensor(self) -> np.ndarray:
        """Reciprocal metric tensor G* = inv(G) (1/Å²): ``1/d² = hᵀ G* h``."""
        return np.linalg.inv(self.metric_tensor())

    @property
    def volume(self) -> float:
        """Cell volume in Å³."""
        return float(math.sqrt(np.linalg.det(self.metric_tensor())))

    def real_basis(self) -> np.ndarray:
        """A (3x3, Å): columns a, b, c in the Cartesian frame (a ∥ x, b in x-y, c* ∥ z)."""
        a, b, c = self.a, self.b, self.c
        al, be, ga = self.angles_rad
        cx = c * math.cos(be)
        cy = c * (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
        cz = math.sqrt(max(c * c - cx * cx - cy * cy, 0.0))
        return np.array(
            [
                [a, b * math.cos(ga), cx],
                [0.0, b * math.sin(ga), cy],
                [0.0, 0.0, cz],
            ]
        )

    def reciprocal_basis(self) -> np.ndarray:
        """B (3x3, 1/Å): columns a*, b*, c*; ``q = B @ hkl`` in the crystal Cartesian frame."""
        return np.linalg.inv(self.real_basis()).T

    def d_spacing(self, hkl: np.ndarray) -> np.ndarray:
        """d (Å) of reflections ``hkl`` (..., 3) from the metric tensor; inf for (0,0,0)."""
        h = np.asarray(hkl, dtype=np.float64)
        inv_d2 = np.einsum("...i,ij,...j->...", h, self.reciprocal_metric_tensor(), h)
        with np.errstate(divide="ignore"):
            return 1.0 / np.sqrt(inv_d2)


def check_cell(cell: UnitCell, system: str, centering: str = "P") -> None:
    """Raise ``ValueError`` naming the violated constraint if ``cell`` does not belong to
    ``system`` or ``centering`` is not a Bravais lattice of that system."""
    system = system.lower()
    if system not in SYSTEMS:
        raise ValueError(f"unknown crystal system {system!r}; use one of {', '.join(SYSTEMS)}")
    if centering not in CENTERINGS:
        raise ValueError(f"unknown lattice centering {centering!r}; use one of {', '.join(CENTERINGS)}")
    if centering not in ALLOWED_CENTERINGS[system]:
        raise ValueError(
            f"centering {centering!r} is not a {system} Bravais lattice; "
            f"allowed: {', '.join(ALLOWED_CENTERINGS[system])}"
        )

    def eq_len(x: float, y: float) -> bool:
        return abs(x - y) <= _LEN_RTOL * max(x, y)

    def eq_ang(x: float, y: float) -> bool:
        return abs(x - y) <= _ANG_TOL

    a, b, c, al, be, ga = cell.as_tuple()
    desc = f"cell ({a:g}, {b:g}, {c:g} Å, {al:g}, {be:g}, {ga:g}°)"
    right = {"alpha": al, "beta": be, "gamma": ga}

    def need_90(names: Sequence[str]) -> None:
        bad = [n for n in names if not eq_ang(right[n], 90.0)]
        if bad:
            raise ValueError(f"{desc} is not {system}: {' and '.join(bad)} must be 90°")

    if system == "triclinic":
        return
    if system == "monoclinic":
        need_90(["alpha", "gamma"])  # b-unique setting
        return
    if system == "orthorhombic":
        need_90(["alpha", "beta", "gamma"])
        return
    if system == "tetragonal":
        need_90(["alpha", "beta", "gamma"])
        if not eq_len(a, b):
            raise ValueError(f"{desc} is not tetragonal: a must equal b")
        return
    if system == "cubic":
        need_90(["alpha", "beta", "gamma"])
        if not (eq_len(a, b) and eq_len(a, c)):
            raise ValueError(f"{desc} is not cubic: a, b and c must be equal")
        return
    hex_axes = eq_len(a, b) and eq_ang(al, 90) and eq_ang(be, 90) and eq_ang(ga, 120)
    if system == "hexagonal":
        if not hex_axes:
            raise ValueError(f"{desc} is not hexagonal: need a = b, alpha = beta = 90°, gamma = 120°")
        return
    # trigonal: hexagonal axes, or rhombohedral axes (a = b = c, alpha = beta = gamma)
    rhombo_axes = eq_len(a, b) and eq_len(a, c) and eq_ang(al, be) and eq_ang(al, ga)
    if hex_axes:
        return
    if rhombo_axes:
        if centering == "R":
            raise ValueError(
                f"{desc}: a rhombohedral-axes cell is primitive; use centering 'P' "
                "(centering 'R' means hexagonal axes with the obverse R absences)"
            )
        return
    raise ValueError(
        f"{desc} is not trigonal: need hexagonal axes (a = b, alpha = beta = 90°, gamma = 120°) "
        "or rhombohedral axes (a = b = c, alpha = beta = gamma)"
    )


def d_spacing_formula(cell: UnitCell, system: str, hkl: np.ndarray) -> np.ndarray:
    """Textbook closed-form d-spacings (Å) per crystal system (independent of the metric tensor;
    used to check it). Monoclinic b-unique; trigonal in hexagonal axes; triclinic falls back to
    the general formula written out term by term."""
    h, k, l = (np.asarray(hkl, dtype=np.float64)[..., i] for i in range(3))
    a, b, c = cell.a, cell.b, cell.c
    al, be, ga = cell.angles_rad
    if system == "cubic":
        inv = (h * h + k * k + l * l) / a**2
    elif system == "tetragonal":
        inv = (h * h + k * k) / a**2 + l * l / c**2
    elif system == "orthorhombic":
        inv = h * h / a**2 + k * k / b**2 + l * l / c**2
    elif system in ("hexagonal", "trigonal") and abs(cell.gamma - 120) < 1e-6:
        inv = 4.0 / 3.0 * (h * h + h * k + k * k) / a**2 + l * l / c**2
    elif system == "trigonal":  # rhombohedral axes
        ca = math.cos(al)
        num = (h * h + k * k + l * l) * math.sin(al) ** 2 + 2 * (h * k + k * l + h * l) * (ca * ca - ca)
        den = a * a * (1 - 3 * ca * ca + 2 * ca**3)
        inv = num / den
    elif system == "monoclinic":
        sb = math.sin(be)
        inv = (h * h / a**2 + k * k * sb * sb / b**2 + l * l / c**2 - 2 * h * l * math.cos(be) / (a * c)) / (
            sb * sb
        )
    else:  # triclinic
        ca, cb, cg = math.cos(al), math.cos(be), math.cos(ga)
        sa, sb, sg = math.sin(al), math.sin(be), math.sin(ga)
        v = a * b * c * math.sqrt(1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg)
        s11, s22, s33 = (b * c * sa) ** 2, (a * c * sb) ** 2, (a * b * sg) ** 2
        s12 = a * b * c * c * (ca * cb - cg)
        s23 = a * a * b * c * (cb * cg - ca)
        s13 = a * b * b * c * (cg * ca - cb)
        inv = (s11 * h * h + s22 * k * k + s33 * l * l + 2 * s12 * h * k + 2 * s23 * k * l + 2 * s13 * h * l) / v**2
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(inv)


def systematic_absent(hkl: np.ndarray, centering: str) -> np.ndarray:
    """Bool (N,): reflections extinct because of the lattice centering.

    A: k+l odd; B: h+l odd; C: h+k odd; I: h+k+l odd; F: h, k, l of mixed parity;
    R (hexagonal axes, obverse setting): -h+k+l not a multiple of 3. Screw-axis and glide
    absences of particular space groups are not applied.
    """
    h, k, l = (np.asarray(hkl)[:, i].astype(np.int64) for i in range(3))
    if centering == "P":
        return np.zeros(h.shape, bool)
    if centering == "A":
        return (k + l) % 2 != 0
    if centering == "B":
        return (h + l) % 2 != 0
    if centering == "C":
        return (h + k) % 2 != 0
    if centering == "I":
        return (h + k + l) % 2 != 0
    if centering == "F":
        return ~(((h % 2) == (k % 2)) & ((k % 2) == (l % 2)))
    if centering == "R":
        return (-h + k + l) % 3 != 0
    raise ValueError(f"unknown centering {centering!r}")


def enumerate_hkl(cell: UnitCell, d_min: float, centering: str = "P") -> np.ndarray:
    """All reflections with d >= d_min (Å), (0,0,0) and centering absences excluded.

    Returns (N, 3) int32, sorted by increasing resolution (1/d).
    """
    if not d_min > 0:
        raise ValueError(f"d_min must be positive, got {d_min}")
    A = cell.real_basis()
    # |h| = |q . a| <= |a| / d_min
    hmax = [int(math.floor(np.linalg.norm(A[:, i]) / d_min)) for i in range(3)]
    gstar = cell.reciprocal_metric_tensor()
    out = []
    hs = np.arange(-hmax[0], hmax[0] + 1)
    ks = np.arange(-hmax[1], hmax[1] + 1)
    ls = np.arange(-hmax[2], hmax[2] + 1)
    kk, ll = np.meshgrid(ks, ls, indexing="ij")
    kk = kk.ravel().astype(np.float64)
    ll = ll.ravel().astype(np.float64)
    lim = 1.0 / d_min**2
    for h in hs:  # slab by slab keeps memory at O(k*l)
        inv = (
            gstar[0, 0] * h * h
            + gstar[1, 1] * kk * kk
            + gstar[2, 2] * ll * ll
            + 2 * gstar[0, 1] * h * kk
            + 2 * gstar[0, 2] * h * ll
            + 2 * gstar[1, 2] * kk * ll
        )
        sel = inv <= lim
        if not np.any(sel):
            continue
        blk = np.empty((int(sel.sum()), 3), np.int32)
        blk[:, 0] = h
        blk[:, 1] = kk[sel]
        blk[:, 2] = ll[sel]
        out.append(blk)
    hkl = np.concatenate(out) if out else np.zeros((0, 3), np.int32)
    keep = np.any(hkl != 0, axis=1) & ~systematic_absent(hkl, centering)
    hkl = hkl[keep]
    inv = np.einsum("ni,ij,nj->n", hkl.astype(np.float64), gstar, hkl.astype(np.float64))
    return np.ascontiguousarray(hkl[np.argsort(inv, kind="stable")])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix (3x3) uniformly distributed on SO(3) (Shoemake's quaternion method)."""
    return random_rotations(rng, 1)[0]


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` rotation matrices (n, 3, 3), uniform on SO(3)."""
    u1, u2, u3 = rng.random((3, n))
    s1, s2 = np.sqrt(1.0 - u1), np.sqrt(u1)
    w = s1 * np.sin(2 * np.pi * u2)
    x = s1 * np.cos(2 * np.pi * u2)
    y = s2 * np.sin(2 * np.pi * u3)
    z = s2 * np.cos(2 * np.pi * u3)
    R = np.empty((n, 3, 3))
    R[:, 0, 0] = 1 - 2 * (y * y + z * z)
    R[:, 0, 1] = 2 * (x * y - z * w)
    R[:, 0, 2] = 2 * (x * z + y * w)
    R[:, 1, 0] = 2 * (x * y + z * w)
    R[:, 1, 1] = 1 - 2 * (x * x + z * z)
    R[:, 1, 2] = 2 * (y * z - x * w)
    R[:, 2, 0] = 2 * (x * z - y * w)
    R[:, 2, 1] = 2 * (y * z + x * w)
    R[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return R
