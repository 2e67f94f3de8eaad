"""The phantom's thorax: body outline and chest wall, diaphragm, heart, great vessels, central airways and the
lung field, as signed-distance fields (mm, positive inside) on the voxel grid.

The formulas use short names for the body frame, as in a drawing: A is the body's half-width, B_ant and
B_post its anterior and posterior half-depths, yc the y of its centre, Z the thorax height (all mm), and s
the organ scale (organ sizes are written for a body 160 mm wide and multiplied by s). Heights of the
diaphragm are fractions of Z. The random draws happen in a fixed order, so one seed gives one phantom.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ctld.demo.phantom_shapes import Grid, add_ellipsoid, add_polyline, rotation


def _wall_thickness_mm(phi, t, organ_scale, wall_shape):
    """Subcutaneous fat and muscle thickness (mm) at angle phi (0 = left, pi/2 = posterior), height t."""
    s = organ_scale
    fat = (6.0 * s * wall_shape[0]) * (1 + 0.35 * np.cos(2 * phi + wall_shape[1]) + 0.2 * np.sin(phi + wall_shape[2]))
    fat = fat * (1 + 0.15 * np.sin(2 * np.pi * t + wall_shape[3]))
    muscle = 7.0 * s * wall_shape[4] * (1 + 1.3 * np.maximum(0, np.sin(phi)) ** 4)  # paraspinal muscles
    muscle = muscle + 5.0 * s * np.maximum(0, -np.sin(phi)) ** 2 * np.clip((t - 0.35) * 3, 0, 1)  # pectoral
    return fat, muscle


@dataclass
class Torso:
    """The body frame every organ is placed in, and the layers of the chest wall."""

    grid: Grid
    height_mm: float  # Z: the thorax fills the slices
    fov_mm: float  # width of the field of view
    half_width_mm: float  # A
    half_depth_anterior_mm: float  # B_ant
    half_depth_posterior_mm: float  # B_post
    center_y_mm: float  # yc
    power: float  # exponent of the superellipse outline
    organ_scale: float  # s
    wobble: np.ndarray  # phases of the outline's drift with height
    wall_shape: np.ndarray  # fat thickness factor, three phases, muscle thickness factor
    height_fraction: np.ndarray  # (D, 1, 1) z / Z: 0 inferior .. 1 superior
    dy_mm: np.ndarray  # (1, H, 1) y - yc
    body_sd: np.ndarray  # skin
    muscle_sd: np.ndarray  # under the subcutaneous fat
    cavity_sd: np.ndarray  # inside the muscle layer

    @property
    def outline_mm(self) -> tuple[float, float, float, float, float]:
        """(A, B_ant, B_post, yc, Z): the outline's half-width, anterior and posterior half-depths, centre, height."""
        return (self.half_width_mm, self.half_depth_anterior_mm, self.half_depth_posterior_mm, self.center_y_mm,
                self.height_mm)

    def wall_point(self, phi: float, z_mm: float, depth_fraction: float) -> np.ndarray:
        """(x, y, z) mm of the point at `depth_fraction` of the muscle layer, along angle phi at height z_mm."""
        A, B_ant, B_post, yc = (
            self.half_width_mm,
            self.half_depth_anterior_mm,
            self.half_depth_posterior_mm,
            self.center_y_mm,
        )
        power, wobble = self.power, self.wobble
        t = z_mm / self.height_mm
        a = A * (1 + 0.04 * math.sin(math.pi * t + wobble[0]) + 0.08 * (0.5 - t))
        b = (B_ant if math.sin(phi) < 0 else B_post) * (1 + 0.03 * math.sin(2 * math.pi * t + wobble[1]))
        c, sn = math.cos(phi), math.sin(phi)
        r_skin = 1.0 / ((abs(c) / a) ** power + (abs(sn) / b) ** power) ** (1 / power)
        fat, muscle = _wall_thickness_mm(np.float64(phi), np.float64(t), self.organ_scale, self.wall_shape)
        r = r_skin - fat - depth_fraction * muscle
        return np.array([r * c, yc + r * sn, z_mm])


def make_torso(rng: np.random.Generator, grid: Grid, height_mm: float, fov_mm: float) -> Torso:
    """Body: a superellipse whose size drifts with z; depth below the skin in mm along rays from its centre,
    then the subcutaneous fat and the muscle layer."""
    zz, yy, xx = grid.full()
    Z = height_mm
    t = zz / np.float32(Z)
    scale = rng.uniform(0.92, 1.03)
    A = 0.40 * fov_mm * scale
    B_ant, B_post = 0.31 * fov_mm * scale * rng.uniform(0.93, 1.0), 0.30 * fov_mm * scale
    yc = 0.03 * fov_mm
    power = rng.uniform(2.2, 2.6)
    s = A / 80.0
    wobble = rng.uniform(0, 2 * math.pi, 6)
    a_z = A * (1 + 0.04 * np.sin(np.pi * t + wobble[0]) + 0.08 * (0.5 - t))  # wider towards the base
    b_z = np.where(yy < yc, B_ant, B_post) * (1 + 0.03 * np.sin(2 * np.pi * t + wobble[1]))
    dxb, dyb = xx, yy - np.float32(yc)
    rho = (np.abs(dxb / a_z) ** power + np.abs(dyb / b_z) ** power) ** (1 / power)
    radial = np.sqrt(dxb**2 + dyb**2)
    body_sd = (radial * (1 / np.maximum(rho, 1e-3) - 1)).astype(np.float32)
    phi = np.arctan2(dyb, dxb)  # 0 = patient's left, +pi/2 = posterior

    wall_shape = np.concatenate([[rng.uniform(0.8, 1.4)], rng.uniform(0, 2 * math.pi, 3), [rng.uniform(0.85, 1.2)]])
    fat_mm, muscle_mm = _wall_thickness_mm(phi, t, s, wall_shape)
    return Torso(
        grid=grid,
        height_mm=Z,
        fov_mm=fov_mm,
        half_width_mm=A,
        half_depth_anterior_mm=B_ant,
        half_depth_posterior_mm=B_post,
        center_y_mm=yc,
        power=power,
        organ_scale=s,
        wobble=wobble,
        wall_shape=wall_shape,
        height_fraction=t,
        dy_mm=dyb,
        body_sd=body_sd,
        muscle_sd=body_sd - fat_mm,
        cavity_sd=body_sd - fat_mm - muscle_mm,
    )


@dataclass
class SpineLayout:
    """Where the vertebral bodies are (the lungs keep out of them; `phantom_skeleton` builds the bones)."""

    body_radius_mm: float
    body_y_mm: float
    level_mm: float  # one vertebra plus its disc
    level_phase_mm: float  # z of a level's lower end plate, modulo level_mm


def make_spine_layout(rng: np.random.Generator, torso: Torso) -> SpineLayout:
    s, Z = torso.organ_scale, torso.height_mm
    radius_mm = 8.5 * s * rng.uniform(0.95, 1.08)
    body_y_mm = torso.center_y_mm + 0.40 * torso.half_depth_posterior_mm
    level_mm = 14.0 * s * rng.uniform(0.92, 1.08) * Z / 100.0
    return SpineLayout(radius_mm, body_y_mm, level_mm, rng.uniform(0, level_mm))


@dataclass
class Diaphragm:
    right_height: float  # dome tops as fractions of Z; the right one is higher (liver)
    left_height: float
    mean_height: float
    dome_z_mm: np.ndarray  # (1, H, W) the diaphragm under each (y, x)
    apex_z_mm: np.ndarray  # (1, H, W) the top of the lungs


def make_diaphragm(rng: np.random.Generator, torso: Torso) -> Diaphragm:
    """Each dome is a paraboloid under its lung, lowest laterally and posteriorly (the costophrenic recesses);
    their maximum is one continuous diaphragm. The apices are the same kind of cap upside down."""
    _, _, xx = torso.grid.full()
    A, B_ant, B_post, Z = (
        torso.half_width_mm,
        torso.half_depth_anterior_mm,
        torso.half_depth_posterior_mm,
        torso.height_mm,
    )
    dyb = torso.dy_mm
    h_right, h_left = rng.uniform(0.22, 0.30), rng.uniform(0.16, 0.23)
    lung_x = 0.5 * A
    recess = 0.3 * np.maximum(0, dyb / B_post) ** 2 + 0.1 * np.minimum(0, dyb / B_ant) ** 2
    h_mean = (h_right + h_left) / 2
    dome = Z * functools.reduce(
        np.maximum,
        [
            h_right - 1.0 * ((xx + lung_x) / A) ** 2 - recess,
            h_left - 1.0 * ((xx - lung_x) / A) ** 2 - recess,
            h_mean - 0.02 - 1.5 * (xx / A) ** 2 - recess,  # the central tendon under the heart
        ],
    ).astype(np.float32)
    apex = (Z * (0.93 - 1.6 * ((np.abs(xx) - lung_x) / A) ** 2 - 0.3 * ((dyb - 0.05 * B_post) / B_post) ** 2)).astype(
        np.float32
    )
    return Diaphragm(h_right, h_left, h_mean, dome, apex)


@dataclass
class Heart:
    center: np.ndarray  # (x, y, z) mm
    axes_mm: np.ndarray  # semi-axes before the turn
    turn: np.ndarray  # rotation of the long axis
    sd: np.ndarray


def make_heart(rng: np.random.Generator, torso: Torso, diaphragm: Diaphragm) -> Heart:
    """A rotated ellipsoid resting on the diaphragm, long axis to the left, anterior and inferior."""
    A, B_ant, yc, Z = torso.half_width_mm, torso.half_depth_anterior_mm, torso.center_y_mm, torso.height_mm
    center = np.array([0.12 * A, yc - 0.30 * B_ant, Z * (diaphragm.mean_height + 0.14)])
    axes_mm = np.array([0.44 * A, 0.40 * B_ant, 0.19 * Z]) * rng.uniform(0.95, 1.05)
    turn = rotation(yaw_deg=-rng.uniform(25, 40), roll_deg=rng.uniform(-15, -5))
    sd = torso.grid.empty()
    add_ellipsoid(torso.grid, sd, center, axes_mm, turn)
    return Heart(center, axes_mm, turn, sd)


@dataclass
class GreatVessels:
    aorta_sd: np.ndarray
    pulmonary_artery_sd: np.ndarray  # trunk and main branches
    svc_sd: np.ndarray
    hilum_left: np.ndarray  # (x, y, z) mm, where the lung trees start
    hilum_right: np.ndarray
    pulmonary_branches: list[tuple[list, np.ndarray]]  # (mid point, hilum) of each main pulmonary artery


def make_great_vessels(torso: Torso, spine: SpineLayout, heart: Heart) -> GreatVessels:
    """Aorta, pulmonary trunk and arteries, superior vena cava: polylines of tubes."""
    grid, s = torso.grid, torso.organ_scale
    A, B_ant, B_post, yc, Z = torso.outline_mm
    rv, y_vert = spine.body_radius_mm, spine.body_y_mm
    top = Z * 1.05
    aorta_pts = [
        heart.center + np.array([-0.10 * A, 0.10 * B_ant, 0.10 * Z]),
        [-0.03 * A, yc - 0.18 * B_ant, 0.62 * Z],
        [-0.02 * A, yc - 0.14 * B_ant, 0.76 * Z],
        [0.03 * A, yc + 0.02 * B_post, 0.84 * Z],  # arch, running posterior and to the left
        [0.12 * A, yc + 0.20 * B_post, 0.83 * Z],
        [0.19 * A, y_vert - 0.6 * rv, 0.74 * Z],
        [0.18 * A, y_vert - 0.5 * rv, 0.40 * Z],
        [0.10 * A, y_vert - 0.8 * rv, -0.05 * Z],
    ]
    aorta_r = np.array([6.5, 6.5, 6.2, 5.8, 5.5, 5.2, 5.0, 4.8]) * s
    aorta_sd = grid.empty()
    add_polyline(grid, aorta_sd, aorta_pts, aorta_r)

    bifurcation = np.array([0.05 * A, yc - 0.10 * B_ant, 0.64 * Z])
    hilum_left = np.array([0.36 * A, yc + 0.08 * B_post, 0.62 * Z])
    hilum_right = np.array([-0.36 * A, yc + 0.04 * B_post, 0.58 * Z])
    pa_sd = grid.empty()
    trunk = [heart.center + np.array([0.02 * A, -0.15 * B_ant, 0.12 * Z]), bifurcation]
    add_polyline(grid, pa_sd, trunk, [6 * s, 5.5 * s])
    pa_branches = [
        ([0.25 * A, yc - 0.02 * B_ant, 0.65 * Z], hilum_left),
        ([-0.10 * A, yc - 0.02 * B_ant, 0.61 * Z], hilum_right),
    ]
    for mid, hilum in pa_branches:
        add_polyline(grid, pa_sd, [bifurcation, mid, hilum], [4.5 * s, 4.2 * s, 3.8 * s])
    svc_sd = grid.empty()
    svc_pts = [[-0.16 * A, yc - 0.10 * B_ant, top], [-0.14 * A, yc - 0.16 * B_ant, 0.48 * Z]]
    add_polyline(grid, svc_sd, svc_pts, [4.5 * s, 4.5 * s])
    return GreatVessels(aorta_sd, pa_sd, svc_sd, hilum_left, hilum_right, pa_branches)


@dataclass
class CentralAirways:
    carina: np.ndarray  # (x, y, z) mm
    bronchus_left: np.ndarray  # end of the main bronchus, where the bronchial tree starts
    bronchus_right: np.ndarray
    lumen_sd: np.ndarray
    outer_sd: np.ndarray  # lumen plus the soft-tissue wall


def make_central_airways(torso: Torso) -> CentralAirways:
    """Trachea and main bronchi: tubes with a soft-tissue wall."""
    grid, s = torso.grid, torso.organ_scale
    A, B_post, yc, Z = torso.half_width_mm, torso.half_depth_posterior_mm, torso.center_y_mm, torso.height_mm
    carina = np.array([0.0, yc + 0.12 * B_post, 0.70 * Z])
    bronchus_left = np.array([0.30 * A, yc + 0.14 * B_post, 0.66 * Z])
    bronchus_right = np.array([-0.30 * A, yc + 0.10 * B_post, 0.64 * Z])
    lumen_sd, outer_sd = grid.empty(), grid.empty()
    for pts, radius in (
        ([[0.0, yc + 0.10 * B_post, Z * 1.05], carina], 5.5 * s),
        ([carina, bronchus_left], 3.8 * s),
        ([carina, bronchus_right], 4.0 * s),
    ):
        add_polyline(grid, lumen_sd, pts, radius)
        add_polyline(grid, outer_sd, pts, radius + 1.3 * s)
    return CentralAirways(carina, bronchus_left, bronchus_right, lumen_sd, outer_sd)


def make_esophagus(torso: Torso) -> np.ndarray:
    A, B_post, yc, Z = torso.half_width_mm, torso.half_depth_posterior_mm, torso.center_y_mm, torso.height_mm
    sd = torso.grid.empty()
    path = [
        [0.03 * A, yc + 0.30 * B_post, Z * 1.05],
        [0.06 * A, yc + 0.30 * B_post, 0.3 * Z],
        [0.15 * A, yc + 0.1 * B_post, -0.05 * Z],
    ]
    add_polyline(torso.grid, sd, path, 3.5 * torso.organ_scale)
    return sd


def make_lung_field(
    torso: Torso,
    spine: SpineLayout,
    diaphragm: Diaphragm,
    heart: Heart,
    vessels: GreatVessels,
    airways: CentralAirways,
    esophagus_sd: np.ndarray,
) -> np.ndarray:
    """The lungs: inside the chest cavity, above the domes, below the apex, outside the mediastinum (fat around
    the heart and the great vessels, the superior mediastinum above the heart, the spine, and a thin septum
    where the lungs meet). One signed field: the min of the constraints, in mm."""
    zz, yy, xx = torso.grid.full()
    A, B_ant, yc, s = torso.half_width_mm, torso.half_depth_anterior_mm, torso.center_y_mm, torso.organ_scale
    rv, y_vert, dyb = spine.body_radius_mm, spine.body_y_mm, torso.dy_mm
    x_med = 0.03 * A
    w_med = (0.05 + 0.02 * np.sin(2 * np.pi * torso.height_fraction + torso.wobble[2])) * A  # the septum
    spine_keepout = np.minimum(rv + 6 * s - np.abs(xx), dyb - (y_vert - yc - rv - 4 * s))
    superior = np.minimum(
        (1 - np.sqrt((xx / (0.17 * A)) ** 2 + ((yy - np.float32(yc - 0.05 * B_ant)) / (0.40 * B_ant)) ** 2)) * 0.17 * A,
        zz - np.float32(heart.center[2]),
    )
    mediastinum_sd = functools.reduce(
        np.maximum,
        [
            heart.sd + 3.0,
            vessels.aorta_sd + 3.0,
            vessels.pulmonary_artery_sd + 3.0,
            vessels.svc_sd + 3.0,
            airways.outer_sd + 3.0,
            esophagus_sd + 3.0,
            spine_keepout,
            superior,
            w_med - np.abs(xx - x_med),
        ],
    )
    constraints = [torso.cavity_sd - 1.5, zz - diaphragm.dome_z_mm, diaphragm.apex_z_mm - zz, -mediastinum_sd]
    return functools.reduce(np.minimum, constraints).astype(np.float32)
