"""Procedural chest CT phantoms: seeded, numpy + scipy only, written as real DICOM series.

    phantom = make_phantom(seed=3)                          # (100, 128, 128) int16 HU, ~0.5 s
    studies = make_cohort("demo_out/phantoms", n_studies=8, seed=0)
    python -m ctld.demo.phantom demo_out/phantoms --n_studies 8 --seed 0

A phantom is a child-sized contrast-enhanced chest CT (CT pulmonary angiography phase), sized so a 1 mm
study of ~100 slices x 128 x 128 pixels of 1.5 mm holds the whole thorax: body outline with subcutaneous fat
and muscle, lungs with a posterior density gradient, branching pulmonary artery, vein and bronchial trees
(tubes that wander and branch obliquely, so they change from one 1 mm slice to the next), the heart with
contrast-filled chambers, aorta, pulmonary trunk and arteries, superior vena cava, trachea, oesophagus,
vertebrae (cancellous bone with a brighter cortex, discs, posterior arches), oblique ribs with costal
cartilage, sternum, liver and stomach below the diaphragm domes, the scanner table, nodules 3-7 mm across
and emboli (filling defects inside arteries). Shapes are painted with soft (partial-volume) edges from signed
distances in mm, blurred by a small point-spread function, and given correlated noise of `noise_hu`.

Geometry is that of `ctld.data.volume.Volume` with an identity direction (axial slices, LPS): column index
i runs to the patient's left, row index j to posterior, slice index k to superior.

A thick series of the same acquisition is the mean of `factor` consecutive thin slices (`simulate_thick`),
positioned at the slab centres (docs/DESIGN.md, Geometry convention), so both the real-pair and the
simulated-thick paths of `ctld-shards build` run on a cohort. Studies carry fake patient identifiers
("PHANTOM^001", birth date, accession number, institution) so the privacy checks have something to remove.

Modules: this one assembles the anatomy (`make_phantom`) and holds the public names; the parts live in
`phantom_tissue` (labels, HU), `phantom_shapes` (signed-distance primitives, painting, branching trees),
`phantom_thorax` (body, chest wall, diaphragm, heart, great vessels, central airways, lung field),
`phantom_lungs` (vessel and bronchial trees, nodules, emboli), `phantom_skeleton` (vertebrae, ribs, sternum)
and `phantom_study` (DICOM studies, cohorts, the command line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ctld.data.transforms import simulate_thick
from ctld.data.volume import Volume
from ctld.demo.phantom_lungs import PulmonaryTrees, grow_pulmonary_trees, place_emboli, place_nodules
from ctld.demo.phantom_shapes import Grid, Painter, add_ellipsoid, rotation
from ctld.demo.phantom_skeleton import Skeleton, make_skeleton
from ctld.demo.phantom_study import PhantomStudy, main, make_cohort, write_study
from ctld.demo.phantom_thorax import (
    CentralAirways,
    Diaphragm,
    GreatVessels,
    Heart,
    Torso,
    make_central_airways,
    make_diaphragm,
    make_esophagus,
    make_great_vessels,
    make_heart,
    make_lung_field,
    make_spine_layout,
    make_torso,
)
from ctld.demo.phantom_tissue import HU, HU_MAX, HU_MIN, Tissue

__all__ = [
    "HU",
    "HU_MAX",
    "HU_MIN",
    "Phantom",
    "PhantomStudy",
    "Tissue",
    "main",
    "make_cohort",
    "make_phantom",
    "thick_volume",
    "write_study",
]


@dataclass
class Phantom:
    """One generated study."""

    hu: np.ndarray  # (D, H, W) int16 HU, thin slices
    labels: np.ndarray  # (D, H, W) uint8 `Tissue`
    spacing_mm: tuple[float, float, float]  # (dz, dy, dx)
    origin_mm: tuple[float, float, float]  # LPS of voxel (0, 0, 0)
    seed: int
    findings: list[dict] = field(default_factory=list)  # nodules and emboli: kind, center_mm, index, radius_mm

    def volume(self) -> Volume:
        return Volume(
            hu=self.hu,
            spacing_mm=self.spacing_mm,
            origin_mm=self.origin_mm,
            direction=np.eye(3),
            meta={"slice_thickness_mm": self.spacing_mm[0], "source": "ctld phantom"},
        )


def thick_volume(thin: Volume, factor: int = 5) -> Volume:
    """The thick series of the same acquisition: slice k = mean of thin slices [k*factor, (k+1)*factor),
    positioned at the slab centre, `(factor - 1) / 2` thin spacings above the slab's first thin slice."""
    dz, dy, dx = thin.spacing_mm
    normal = np.asarray(thin.direction)[:, 2]
    origin = np.asarray(thin.origin_mm) + (factor - 1) / 2 * dz * normal
    return Volume(
        hu=simulate_thick(thin.hu, factor),
        spacing_mm=(dz * factor, dy, dx),
        origin_mm=tuple(origin),
        direction=thin.direction,
        meta={**thin.meta, "slice_thickness_mm": dz * factor},
    )


def make_phantom(
    seed: int,
    *,
    num_slices: int = 100,
    size: int = 128,
    slice_spacing_mm: float = 1.0,
    pixel_spacing_mm: float = 1.5,
    noise_hu: float = 15.0,
) -> Phantom:
    """Generate one thin-slice chest CT phantom.

    Args:
        seed: everything (anatomy, findings, noise) follows from it; the same seed gives the same array.
        num_slices: D, slices along z (inferior to superior); the thorax is scaled to fill them.
        size: H = W in pixels; the body fills ~85% of the field of view.
        slice_spacing_mm: dz (thin slices).
        pixel_spacing_mm: dy = dx.
        noise_hu: standard deviation of the correlated noise inside the body (0 for a noise-free phantom).

    Returns:
        A `Phantom` with int16 HU, tissue labels and the list of nodules and emboli.
    """
    if num_slices < 10 or size < 32:
        raise ValueError(f"phantom needs num_slices >= 10 and size >= 32, got {num_slices} and {size}")
    # Every step below draws from one generator, so their order is part of what a seed means.
    rng = np.random.default_rng(seed)
    spacing_mm = (float(slice_spacing_mm), float(pixel_spacing_mm), float(pixel_spacing_mm))
    grid = Grid((num_slices, size, size), spacing_mm)
    height_mm = num_slices * slice_spacing_mm
    z_offset_mm = -round(height_mm / 2)  # the written study has z = 0 mid-thorax

    torso = make_torso(rng, grid, height_mm, size * pixel_spacing_mm)
    spine = make_spine_layout(rng, torso)
    diaphragm = make_diaphragm(rng, torso)
    heart = make_heart(rng, torso, diaphragm)
    vessels = make_great_vessels(torso, spine, heart)
    airways = make_central_airways(torso)
    esophagus_sd = make_esophagus(torso)
    lung_sd = make_lung_field(torso, spine, diaphragm, heart, vessels, airways, esophagus_sd)
    trees = grow_pulmonary_trees(rng, torso, lung_sd, vessels, airways, diaphragm.mean_height)
    nodule_sd, nodule_hu, nodules = place_nodules(rng, torso, lung_sd, z_offset_mm)
    embolus_sd, emboli = place_emboli(rng, torso, trees, vessels, z_offset_mm)

    # Paint, outside in.
    painter = Painter(grid, HU["air"])
    _paint_wall_and_abdomen(rng, painter, torso, diaphragm)
    _paint_lungs(rng, painter, torso, lung_sd, trees, nodule_sd, nodule_hu)
    _paint_heart(painter, torso, heart)
    _paint_mediastinum(painter, torso, vessels, airways, esophagus_sd, trees.artery_sd, embolus_sd)
    _paint_skeleton(painter, make_skeleton(rng, torso, spine, diaphragm.mean_height))
    _paint_table(painter, torso)
    hu = _acquire(rng, painter.hu, torso.body_sd, spacing_mm, noise_hu)

    origin_mm = (float(grid.x[0]), float(grid.y[0]), float(z_offset_mm))
    return Phantom(
        hu=hu, labels=painter.labels, spacing_mm=spacing_mm, origin_mm=origin_mm, seed=seed, findings=nodules + emboli
    )


def _paint_wall_and_abdomen(rng: np.random.Generator, painter: Painter, torso: Torso, diaphragm: Diaphragm) -> None:
    """Subcutaneous fat, muscle, mediastinal fat filling the cavity, and below the domes the liver and the
    stomach with a gas level."""
    grid = painter.grid
    zz, yy, _ = grid.full()
    A, B_ant, yc, Z = torso.half_width_mm, torso.half_depth_anterior_mm, torso.center_y_mm, torso.height_mm
    painter.paint(torso.body_sd, HU["fat"], Tissue.FAT)
    painter.paint(torso.muscle_sd, HU["muscle"], Tissue.MUSCLE)
    painter.paint(torso.cavity_sd, HU["mediastinum"], Tissue.FAT)
    abdomen_sd = np.minimum(torso.cavity_sd, diaphragm.dome_z_mm - zz)
    painter.paint(abdomen_sd, HU["liver"], Tissue.SOFT_TISSUE)
    stomach_c = np.array([0.38 * A, yc - 0.15 * B_ant, Z * (diaphragm.left_height - 0.10)])
    stomach_sd = grid.empty()
    add_ellipsoid(grid, stomach_sd, stomach_c, [0.22 * A, 0.28 * B_ant, 0.12 * Z], rotation(yaw_deg=30))
    stomach_sd = np.minimum(stomach_sd, abdomen_sd - 3)
    painter.paint(stomach_sd, HU["soft"] - 25, Tissue.SOFT_TISSUE)
    air_level = stomach_c[1] - rng.uniform(0.0, 0.15) * B_ant  # supine: gas rises anteriorly (smaller y)
    painter.paint(np.minimum(stomach_sd - 1.5, np.float32(air_level) - yy), HU["air"], Tissue.AIRWAY)


def _paint_lungs(
    rng: np.random.Generator,
    painter: Painter,
    torso: Torso,
    lung_sd: np.ndarray,
    trees: PulmonaryTrees,
    nodule_sd: np.ndarray,
    nodule_hu: np.ndarray,
) -> None:
    """Lung parenchyma with a smooth texture, then the bronchi, veins, arteries and nodules inside it."""
    depth, height, width = painter.grid.shape
    smooth = ndimage.gaussian_filter(rng.standard_normal((depth // 4 + 1, height // 4 + 1, width // 4 + 1)), 1.5)
    smooth = ndimage.zoom(smooth / max(smooth.std(), 1e-6), 4, order=1)[:depth, :height, :width].astype(np.float32)
    # posterior (dependent) lung is denser
    lung_hu = HU["lung"] + 45.0 * (torso.dy_mm / torso.half_depth_posterior_mm) + 18.0 * smooth
    painter.paint(lung_sd, lung_hu, Tissue.LUNG)
    painter.paint(np.minimum(trees.bronchus_outer_sd, lung_sd + 3), HU["soft"], Tissue.SOFT_TISSUE)
    painter.paint(np.minimum(trees.bronchus_lumen_sd, lung_sd + 3), HU["air"] + 40, Tissue.AIRWAY)
    painter.paint(trees.vein_sd, HU["vein"], Tissue.BLOOD)
    painter.paint(trees.artery_sd, HU["artery"], Tissue.BLOOD)
    painter.paint(nodule_sd, nodule_hu, Tissue.NODULE)


def _paint_heart(painter: Painter, torso: Torso, heart: Heart) -> None:
    """Myocardium, then the chambers (right = arterial contrast, left = venous), split by the septum."""
    grid, s = painter.grid, torso.organ_scale
    _, yy, xx = grid.full()
    painter.paint(heart.sd, HU["myocardium"], Tissue.SOFT_TISSUE)
    chambers = grid.empty()
    add_ellipsoid(grid, chambers, heart.center, heart.axes_mm - 4.0 * s, heart.turn)
    normal = heart.turn[:, 0]  # septum plane through the centre, normal along the long axis in-plane
    septum = (xx - np.float32(heart.center[0])) * np.float32(normal[1]) - (
        yy - np.float32(heart.center[1])
    ) * np.float32(normal[0])
    painter.paint(np.minimum(chambers, septum - 1.5 * s), HU["artery"], Tissue.BLOOD)
    painter.paint(np.minimum(chambers, -septum - 1.5 * s), HU["vein"], Tissue.BLOOD)


def _paint_mediastinum(
    painter: Painter,
    torso: Torso,
    vessels: GreatVessels,
    airways: CentralAirways,
    esophagus_sd: np.ndarray,
    artery_sd: np.ndarray,
    embolus_sd: np.ndarray,
) -> None:
    """Great vessels, the emboli inside the pulmonary arteries, trachea and main bronchi, oesophagus."""
    zz, _, _ = painter.grid.full()
    painter.paint(vessels.aorta_sd, HU["vein"], Tissue.BLOOD)
    painter.paint(vessels.pulmonary_artery_sd, HU["artery"], Tissue.BLOOD)
    inside_arteries = np.maximum(artery_sd, vessels.pulmonary_artery_sd)
    painter.paint(np.minimum(embolus_sd, inside_arteries), HU["embolus"], Tissue.EMBOLUS)
    painter.paint(vessels.svc_sd, HU["svc"], Tissue.BLOOD)
    # the airway wall only in the mediastinum, not above the thoracic inlet
    painter.paint(np.minimum(airways.outer_sd, zz - airways.carina[2] + 30), HU["soft"], Tissue.SOFT_TISSUE)
    painter.paint(airways.lumen_sd, HU["air"] + 20, Tissue.AIRWAY)
    painter.paint(esophagus_sd, HU["soft"], Tissue.SOFT_TISSUE)


def _paint_skeleton(painter: Painter, bones: Skeleton) -> None:
    painter.paint(bones.cartilage_sd, HU["cartilage"], Tissue.SOFT_TISSUE)
    painter.paint(bones.disc_sd, HU["disc"], Tissue.SOFT_TISSUE)
    painter.paint(np.maximum(bones.cortex_sd, bones.sternum_sd), HU["cortex"], Tissue.CORTEX)
    painter.paint(np.maximum(bones.bone_sd, bones.sternum_sd - 1.2), HU["bone"], Tissue.BONE)
    painter.paint(np.minimum(bones.canal_sd, -bones.bone_sd), HU["csf"], Tissue.SOFT_TISSUE)


def _paint_table(painter: Painter, torso: Torso) -> None:
    """Scanner table under the patient: two shells around a foam core, curved with the back."""
    grid = painter.grid
    _, yy, xx = grid.full()
    A, B_post, yc = torso.half_width_mm, torso.half_depth_posterior_mm, torso.center_y_mm
    table_y = yc + B_post + 4.0 + 0.02 * xx**2 / A
    within = (0.48 * torso.fov_mm - np.abs(xx)).astype(np.float32)
    shell = np.minimum(within, 3.0 - np.abs(yy - (table_y + 3.0)))
    painter.paint(np.broadcast_to(shell, grid.shape), HU["table_shell"], Tissue.TABLE)
    core = np.minimum(within - 2, 1.8 - np.abs(yy - (table_y + 3.0)))
    painter.paint(np.broadcast_to(core, grid.shape), HU["table_core"], Tissue.TABLE)


def _acquire(
    rng: np.random.Generator,
    painted_hu: np.ndarray,
    body_sd: np.ndarray,
    spacing_mm: tuple[float, float, float],
    noise_hu: float,
) -> np.ndarray:
    """Acquisition: point-spread blur, then correlated noise (stronger inside the body, as photon counts drop);
    rounded to int16 HU in the range a 12-bit CT stores."""
    blur_sigma = (0.5 / spacing_mm[0], 0.5 / spacing_mm[1], 0.5 / spacing_mm[2])  # 0.5 mm in voxels
    hu = ndimage.gaussian_filter(painted_hu, sigma=blur_sigma)
    if noise_hu > 0:
        noise = ndimage.gaussian_filter(rng.standard_normal(painted_hu.shape, dtype=np.float32), sigma=(0.4, 0.8, 0.8))
        noise *= np.float32(noise_hu) / max(float(noise.std()), 1e-6)
        inside = np.clip(0.5 + body_sd / 10.0, 0.0, 1.0)
        hu += noise * (0.6 + 0.4 * inside)
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


if __name__ == "__main__":
    raise SystemExit(main())
