"""`ctld-infer`: a thick CT series in (DICOM folder/ZIP or NIfTI), a thin series out, with a ctld export.

    ctld-infer thick_series/ --checkpoint runs/ctld/export --out thin/ --format dicom --sampler ddim --steps 20
    ctld-infer thick.nii.gz --checkpoint runs/ctld/export --out thin.nii.gz --format nifti --seed 1
    ctld-infer thick.nii.gz --checkpoint runs/ctld/export --out thin.nii.gz --adapt 200 --save_adapted adapted/

Settings: a flag wins, then a key that --config's `infer` section sets, then the settings the export was
validated with (ctld.json `infer`), then the defaults (ctld/infer_settings.py); one printed line names each
setting's source. The series is read (ctld/series_io.py), checked against what the model was trained for
(ctld/data/geometry.py: tilt; ctld/data/domain.py: spacing, pixel size and HU, refused or warned about; go on with
--allow_out_of_distribution), run through the sliding-window inferer (ctld/inferer.py) with the export's
predictor (ctld/predictors.py) and written as a new series on the thin grid of docs/DESIGN.md. With
`--adapt STEPS` a copy of the export's U-Net is first fine-tuned on in-plane pairs of the input series itself
(ctld/adapt.py); the export on disk is never changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ctld.config import InferConfig
from ctld.data.domain import check_input, input_differences, model_pixel_spacing_mm
from ctld.data.geometry import check_thick_input
from ctld.export import read_export_meta
from ctld.infer_settings import describe, resolve_settings
from ctld.inferer import interpolate_at_spacing
from ctld.predictors import CtldPredictor
from ctld.series_io import read_input, thin_volume_like, write_output

logger = logging.getLogger(__name__)


SETTINGS_HELP = (
    "Settings: a flag wins; else a key --config's `infer` section sets; else the settings the export was "
    "validated with (ctld.json `infer`, recorded by training); else the built-in defaults. One line "
    "`settings: name=value (flag|config|export|default), ...` says which ran."
)


def infer_config_from(args: argparse.Namespace, recorded: dict | None = None) -> InferConfig:
    """InferConfig of flags > --config's infer section > the export's recorded settings > the defaults
    (`ctld.infer_settings.resolve_settings`, which also says where each came from)."""
    return resolve_settings(args, recorded)[0]


def add_infer_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ctld-infer and ctld-eval; unset ones come from --config, the export or the defaults."""
    parser.add_argument("--config", default=None,
                        help="YAML config whose `infer` section overrides the export's recorded settings (the keys "
                             "it sets; a `base:` chain counts)")
    parser.add_argument("--mode", choices=("regression", "diffusion"), default=None,
                        help="regression: one pass, the conditional mean (best PSNR, fastest); diffusion: samples "
                             "started from the anchored one-pass estimate noised to the export's strength, "
                             "averaged over --num_samples")
    parser.add_argument("--sampler", choices=("ddim", "dpm", "ddpm"), default=None, help="sampling scheduler")
    parser.add_argument("--steps", dest="num_inference_steps", type=int, default=None,
                        help="diffusion mode: denoising steps")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling noise (reproducible output)")
    parser.add_argument("--num_samples", type=int, default=None, help="diffusion samples averaged per window")
    parser.add_argument("--self_ensemble", type=int, choices=(1, 2, 4, 8), default=None,
                        help="mirrored copies of each window averaged: 2 = z, 4 = z and x, 8 = z, x and y flips "
                             "(that many times the model's time)")
    parser.add_argument("--batch_size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--depth_context", type=int, default=None,
                        help="thick slices at each window end used only as context")
    parser.add_argument("--depth_overlap", type=int, default=None,
                        help="contributing thick slices shared (blended) by neighbouring windows")
    parser.add_argument("--inplane_overlap", type=float, default=None, help="fraction of a tile shared by neighbours")
    parser.add_argument("--window_depth", type=int, default=None,
                        help="thick slices per window; 0 = automatic (up to 32 for a fully convolutional model, "
                             "else its training depth)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="in-plane tile edge in pixels; 0 = automatic (whole slices up to 512 px for a fully "
                             "convolutional model, else its training patch)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--adapt", dest="adapt_steps", type=int, default=None, metavar="STEPS",
                        help="fine-tune a copy of the U-Net for STEPS steps on in-plane pairs of the thick series "
                             "itself before interpolating it (0 = off; the export is never modified)")
    parser.add_argument("--adapt_lr", type=float, default=None, help="AdamW learning rate of --adapt")
    parser.add_argument("--adapt_seed", type=int, default=None, help="seed of --adapt (same seed -> same weights)")
    parser.add_argument("--adapt_batch_size", type=int, default=None, help="patches per --adapt step")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a terminal)")


def check_adapt_settings(cfg: InferConfig) -> None:
    """Refuse adaptation settings that cannot run (before any series is read)."""
    from ctld.adapt import check_settings

    if cfg.adapt_steps < 0:
        raise ValueError(f"--adapt STEPS must be >= 0 (0 = no adaptation), got {cfg.adapt_steps}")
    if cfg.adapt_steps > 0:
        check_settings(steps=cfg.adapt_steps, lr=cfg.adapt_lr, batch_size=cfg.adapt_batch_size)


def adapted_export(export, thick_hu, spacing_mm, cfg: InferConfig, device):
    """`export` fine-tuned on the series (ctld.adapt.adapt_export) when cfg.adapt_steps > 0, else `export`."""
    if cfg.adapt_steps <= 0:
        return export
    from ctld.adapt import adapt_export

    return adapt_export(export, thick_hu, spacing_mm, steps=cfg.adapt_steps, seed=cfg.adapt_seed, lr=cfg.adapt_lr,
                        batch_size=cfg.adapt_batch_size, device=device)


def window_kwargs(cfg: InferConfig) -> dict:
    """The sliding-window settings of `cfg` as `ctld.inferer.interpolate_volume` keywords."""
    return {"depth_context": cfg.depth_context, "depth_overlap": cfg.depth_overlap,
            "inplane_overlap": cfg.inplane_overlap, "batch_size": cfg.batch_size, "window_depth": cfg.window_depth,
            "tile_size": cfg.tile_size}


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctld-infer",
        description="Thick CT series (DICOM folder/ZIP or NIfTI) -> thin series with a ctld export.",
        epilog=SETTINGS_HELP + " Inputs outside the export's training domain (slice or pixel spacing, HU) are "
               "refused or warned about, naming the difference; --allow_out_of_distribution goes on.",
    )
    parser.add_argument("input", help="thick series: a DICOM folder or ZIP holding one CT series, or a NIfTI file")
    parser.add_argument("--checkpoint", required=True, help="export folder of a diffusion run (runs/<name>/export)")
    parser.add_argument("--out", required=True,
                        help="output: a new folder (dicom, both) or a .nii/.nii.gz file or folder (nifti)")
    parser.add_argument("--format", choices=("dicom", "nifti", "both"), default=None,
                        help="output format (default: that of the input); both = OUT/dicom/ and OUT/thin.nii.gz")
    parser.add_argument("--series_id", default="", help="which series of a multi-series input (id from the error)")
    parser.add_argument("--spacing_tolerance", type=float, default=None,
                        help="refuse series whose spacing lies more than this ratio outside factor x the trained thin "
                             "spacings (default 0.5); -1 = never refuse")
    parser.add_argument("--allow_out_of_distribution", action="store_true",
                        help="run on an input the export was not trained for (spacing, pixel size, HU) with a "
                             "warning instead of refusing it")
    parser.add_argument("--save_adapted", default=None, metavar="DIR",
                        help="with --adapt: also write the adapted model as an export folder DIR")
    add_infer_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ctld.data.dicom import SeriesSkipped
    from ctld.export import load_export

    try:
        cfg, sources = resolve_settings(args, read_export_meta(args.checkpoint).get("infer"))
        check_adapt_settings(cfg)
        if args.save_adapted and cfg.adapt_steps <= 0:
            raise ValueError("--save_adapted needs --adapt STEPS > 0 (there is nothing adapted to save)")
        if args.save_adapted and Path(args.save_adapted).resolve() == Path(args.checkpoint).resolve():
            raise ValueError("--save_adapted must not be the --checkpoint folder: the base export is never replaced")
        print(describe(cfg, sources), flush=True)
        device = pick_device(args.device)
        export = load_export(args.checkpoint, device, need_unet=True)
        meta = export.meta
        factor = int(meta["factor"])
        volume, reference, kind = read_input(args.input, series_id=args.series_id)
        # Tilt is refused here whatever the flags (the grid cannot be handled); spacing, pixel size and HU by the
        # training domain (ctld.data.domain), which --allow_out_of_distribution turns into warnings.
        check_thick_input(volume, factor=factor, name=str(args.input),
                          slice_thickness_mm=volume.meta.get("slice_thickness_mm"))
        check_input(input_differences(volume.hu, volume.spacing_mm, meta, spacing_tolerance=cfg.spacing_tolerance),
                    name=str(args.input), allow=args.allow_out_of_distribution)
        export = adapted_export(export, volume.hu, volume.spacing_mm, cfg, device)
        if args.save_adapted:
            from ctld.adapt import save_adapted

            print(f"wrote {save_adapted(export, args.save_adapted)}")
        predictor = CtldPredictor(export, mode=cfg.mode, sampler=cfg.sampler,
                                  num_inference_steps=cfg.num_inference_steps, num_samples=cfg.num_samples,
                                  seed=cfg.seed, self_ensemble=cfg.self_ensemble, device=device)
        thin_hu = interpolate_at_spacing(
            volume.hu, predictor, pixel_spacing_mm=volume.spacing_mm[1:],
            model_pixel_spacing_mm=model_pixel_spacing_mm(meta, volume.spacing_mm[1:]), factor=factor,
            depth_thick=int(meta["depth_thick"]), patch_size=int(meta["patch_size"]),
            hu_range=(float(meta["hu_min"]), float(meta["hu_max"])),
            **window_kwargs(cfg), device=device, progress=False if args.no_progress else None,
        )
        thin = thin_volume_like(volume, thin_hu, factor)
        written = write_output(thin, args.out, args.format or kind, reference=reference)
    except (ValueError, FileNotFoundError, FileExistsError, SeriesSkipped) as error:
        print(f"ctld-infer: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
