"""`ctld-shards`: build, inspect and verify the WebDataset shards ctld trains on, and encode them into latents.

    ctld-shards build /data/dicom /data/more.zip /data/nifti --out shards --config configs/base.yaml \
        --shards.num_workers=8 --data.factor=5
    ctld-shards inspect shards          # manifest summary
    ctld-shards verify shards           # re-read every shard: sha256, sample count, decodable arrays
    ctld-shards encode --vae runs/vae1/export shards --out latent_shards --config configs/base.yaml
                                        # latent shards for the diffusion stage (ctld/data/encode_latents.py)

Archive scale (ctld/data/shard_merge.py, k8s/README.md): N machines build one partition each into one folder,
then one merge writes the manifest; the encode runs one process per GPU:

    ctld-shards build /data/raw --out shards --config configs/base.yaml --partition 3/16   # or --partition 16
                                        # in a Kubernetes Indexed Job (index from $JOB_COMPLETION_INDEX)
    ctld-shards merge shards            # all 16 complete, same settings and salt -> shards/manifest.json
    accelerate launch --multi_gpu --num_processes 8 -m ctld.data.build_shards encode --vae runs/vae1/export \
        shards --out latent_shards --config configs/base.yaml

Build: find files (folders, ZIPs, NIfTI, preprocessed cache) -> scan DICOM headers (worker processes) -> group,
validate and sort series -> pair thick/thin (or plan a simulated thick) -> assign samples to shards by patient
split -> decode and write shards (worker processes, tqdm) -> manifest.json. The shard plan is fixed before any
pixel is decoded, so a rerun after an interruption rebuilds exactly the shards that were not finished and the
result equals an uninterrupted build. Each shard is written under a temporary name and renamed when complete;
`<out>/.done/<shard>.json` records it. A bad series is skipped and recorded, never fatal; the build fails (exit 1)
only when more than `shards.max_skipped_fraction` of the series are skipped. The plan is made in
ctld/data/shard_plan.py, shards are written by ctld/data/shard_writer.py, the salt comes from ctld/data/salt.py.

Privacy: samples are keyed by salted HMAC-SHA256 hashes; the salt comes from `shards.salt`, else `$CTLD_SALT`,
else a random salt kept per user in `$CTLD_SALT_FILE` or `~/.config/ctld/salt` (mode 0600) so reruns hash
identically. The salt is never written to shards, the manifest or anywhere in the shard folder. Log lines about
skipped series name the hashed series id and the file path relative to its source folder (needed to fix the
input; folder names chosen by the user may still appear in logs, never in shards or the manifest).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tarfile
from collections import Counter
from pathlib import Path

from ctld.config import Config, ConfigError, build_config, load_config, parse_overrides
from ctld.data.archive import discover
from ctld.data.salt import resolve_salt
from ctld.data.shard_merge import merge, write_partition
from ctld.data.shard_plan import (
    DONE_DIR,
    PARTITION,
    PLAN,
    TMP_PREFIX,
    Builder,
    parse_partition,
    partition_dir,
    worker_pool,
)
from ctld.data.shard_writer import atomic_json, build_shard, load_done, manifest_doc, sha256_of, write_manifest
from ctld.data.shards import MANIFEST, decode_sample, read_manifest
from ctld.data.tar_reader import iter_raw_samples

logger = logging.getLogger(__name__)


def build(sources: list[str], cfg: Config, out_dir: Path, *, overwrite: bool = False,
          partition: tuple[int, int] | None = None) -> int:
    """Build shards from `sources` into `out_dir`; returns the exit code (0 ok, 1 too many skipped). With
    `partition` (index, count) only that partition's patients, into `out_dir/part-IIII-of-NNNN` with a
    partition.json instead of the manifest (`ctld-shards merge` writes that)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    salt = resolve_salt(cfg.shards.salt, out_dir)
    # A partition owns its sub-folder: N pods on one shared volume never clean up, overwrite or list each other's
    # files, and each resumes like a whole build.
    build_dir = out_dir / partition_dir(*partition) if partition else out_dir
    (build_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
    for stale in build_dir.glob(TMP_PREFIX + "*"):  # partial shards of an interrupted run
        stale.unlink()
    (build_dir / PARTITION).unlink(missing_ok=True)  # there only while the partition is complete
    builder = Builder(cfg, build_dir, salt, partition)
    archive_skips: list = []
    num_workers = max(1, cfg.shards.num_workers)
    # One pool for the header scan and the decode; forked before any plan exists, jobs travel pickled.
    pool = worker_pool(num_workers) if num_workers > 1 else None
    try:
        records, shards = _build_in(sources, cfg, build_dir, builder, archive_skips, pool, overwrite)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    ordered = [records[s.name] for s in shards]
    plan_info = {
        "skipped": builder.skipped,
        "unused": builder.unused,
        "files_skipped": dict(sorted(builder.file_skips.items())),
        "series_total": builder.series_total,
        "archives_skipped": len(archive_skips),
    }
    if partition:
        write_partition(build_dir, builder, ordered, plan_info)
        return 0  # the skipped fraction is of the whole set: `ctld-shards merge` checks it
    manifest = manifest_doc(builder.settings(), ordered, plan_info)
    return write_manifest(out_dir, manifest, cfg.shards.max_skipped_fraction)


def _build_in(sources, cfg: Config, out_dir: Path, builder: Builder, archive_skips: list, pool, overwrite: bool):
    from tqdm import tqdm

    with discover(
        sources,
        max_bytes=cfg.shards.max_archive_bytes,
        max_members=cfg.shards.max_archive_members,
        skipped=archive_skips,
    ) as files:
        shards = builder.plan(files, pool)
        logger.info(
            "%d files, %d series: %d samples planned in %d shards",
            len(files), builder.series_total, sum(len(s.jobs) for s in shards), len(shards),
        )  # fmt: skip
        fingerprint = builder.plan_fingerprint(shards)
        plan_path = out_dir / PLAN
        previous = json.loads(plan_path.read_text()).get("fingerprint") if plan_path.is_file() else None
        if previous is not None and previous != fingerprint:
            if not overwrite:
                raise SystemExit(
                    f"ctld-shards: {out_dir} holds shards of a different build (other inputs or settings). Use a new "
                    "--out folder, or pass --overwrite to delete them and rebuild."
                )
            for old in [*out_dir.glob("*.tar"), *(out_dir / DONE_DIR).glob("*.json"), out_dir / MANIFEST]:
                old.unlink(missing_ok=True)
        atomic_json(plan_path, {"fingerprint": fingerprint})
        planned = {s.name for s in shards}
        for old in out_dir.glob("*.tar"):  # shards no plan names (e.g. a smaller rebuild) would confuse loaders
            if old.name not in planned:
                old.unlink()

        records = {s.name: load_done(out_dir, s.name) for s in shards}
        todo = [s for s in shards if records[s.name] is None]
        if len(shards) > len(todo):
            logger.info("resuming: %d of %d shards already complete", len(shards) - len(todo), len(shards))
        settings = (
            cfg.data.factor,
            builder.salt,
            cfg.shards.thin_max_spacing_mm,
            cfg.shards.thick_min_spacing_mm,
            cfg.shards.inplane_spacing_mm,
            cfg.data.thick_profile,
        )
        tasks = [(out_dir, shard, settings) for shard in todo]
        # Workers write whole shards: shipping decoded volumes back to one writer process costs more than the
        # decode itself (pickling ~10 MB per series). Parallelism is therefore over shards.
        finished = pool.imap_unordered(build_shard, tasks) if pool is not None and len(tasks) > 1 else None
        with tqdm(total=sum(len(s.jobs) for s in todo), desc="ctld-shards", unit="series", disable=None) as bar:
            for record in finished if finished is not None else map(build_shard, tasks):
                records[record["name"]] = record
                bar.update(record["samples"] + len(record["skipped"]))
    return records, shards



# ----------------------------------------------------------------------------------------------- inspect / verify


def inspect(out_dir: Path) -> int:
    manifest = read_manifest(out_dir)
    print(
        f"{out_dir}: format {manifest['format_version']}, factor {manifest['factor']}, {manifest['samples']} samples "
        f"({', '.join(f'{k} {v}' for k, v in sorted(manifest['thick_source'].items())) or 'none'})"
    )
    for split, info in manifest["splits"].items():
        print(f"  {split:5s} {info['shards']:4d} shards {info['samples']:6d} samples {info['bytes'] / 1e6:10.1f} MB")
    for name, stats in manifest["geometry"].items():
        if stats:
            print(f"  {name:20s} min {stats['min']:g}  median {stats['median']:g}  max {stats['max']:g}")
    print(
        f"  series {manifest['series_total']}, skipped {len(manifest['skipped'])} "
        f"({manifest['skipped_fraction']:.1%}): {manifest['skipped_counts']}"
    )
    if manifest.get("partitions"):
        print(f"  merged from {manifest['partitions']['count']} partitions (part-IIII-of-NNNN folders)")
    if manifest["unused"]:
        print(f"  unused series: {dict(Counter(u['reason'] for u in manifest['unused']))}")
    if manifest["files_skipped"]:
        print(f"  files skipped: {manifest['files_skipped']}")
    return 0


def verify_shard(path: Path, expected: dict) -> str | None:
    """None if the shard matches its manifest entry and every sample decodes, else what is wrong."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"size {size} bytes, manifest says {expected['bytes']} (truncated or replaced)"
    if sha256_of(path) != expected["sha256"]:
        return "sha256 differs from the manifest (corrupt)"
    samples = 0
    try:
        for raw in iter_raw_samples(str(path)):
            extra = sorted(set(raw) - {"__key__", "__url__", "thin.npy", "thick.npy", "json"})
            if extra:
                return f"sample {raw['__key__']} has unexpected files {extra}"
            decode_sample(raw)  # every file present, int16 arrays of the shapes its json states
            samples += 1
    except (tarfile.TarError, ValueError, OSError) as error:
        return f"undecodable after {samples} samples: {type(error).__name__}: {error}"
    if samples != expected["samples"]:
        return f"{samples} samples, manifest says {expected['samples']}"
    return None


def verify(out_dir: Path) -> int:
    manifest = read_manifest(out_dir)
    bad = 0
    for entry in manifest["shards"]:
        problem = verify_shard(out_dir / entry["name"], entry)
        if problem:
            bad += 1
            print(f"BAD  {entry['name']}: {problem}")
        else:
            print(f"ok   {entry['name']}: {entry['samples']} samples")
    print(f"{len(manifest['shards']) - bad} of {len(manifest['shards'])} shards ok")
    if bad:
        print(
            f"ctld-shards verify: {bad} bad shard(s); rebuild with `ctld-shards build ... --out {out_dir}` after "
            "deleting them (complete shards are kept)",
            file=sys.stderr,
        )
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctld-shards", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build shards from DICOM folders/ZIPs, NIfTI, cache volumes")
    build_parser.add_argument("sources", nargs="+", help="input folders, ZIP files, NIfTI or cache files")
    build_parser.add_argument("--out", help="output folder (default: shards.out_dir from the config)")
    build_parser.add_argument("--config", help="YAML config (default: built-in defaults = configs/base.yaml)")
    build_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete shards of a different earlier build in --out instead of refusing",
    )
    build_parser.add_argument("--pairs", choices=("through", "inplane"), default=None,
                              help="inplane: also make in-plane training pairs from thick series without a thin "
                                   "partner (default: shards.pairs)")
    build_parser.add_argument("--partition", default=None,
                              help="I/N: build only partition I (0..N-1) of N, patients split by their salted hash, "
                                   "into OUT/part-IIII-of-NNNN; N alone takes I from $JOB_COMPLETION_INDEX (a "
                                   "Kubernetes Indexed Job). `ctld-shards merge OUT` then writes the manifest")
    build_parser.add_argument("--log_level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    for name, text in (("inspect", "print the manifest summary"), ("verify", "re-read and check every shard"),
                       ("merge", "join the complete partitions of a partitioned build into manifest.json")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("out", help="a folder written by `ctld-shards build`")
    encode_parser = commands.add_parser(
        "encode", help="encode pixel shards once with a frozen VAE into latent shards for the diffusion stage")
    encode_parser.add_argument("shards", help="a folder written by `ctld-shards build`")
    encode_parser.add_argument("--vae", required=True, help="the VAE stage's export folder (runs/<name>/export)")
    encode_parser.add_argument("--out", required=True, help="output folder of the latent shards")
    encode_parser.add_argument("--config", help="the diffusion stage's YAML config (patch geometry, prior)")
    encode_parser.add_argument("--patches_per_volume", type=int, default=16,
                               help="patch pairs cut and encoded per volume (the pool the trainer draws from)")
    encode_parser.add_argument("--batch_size", type=int, default=8, help="patches per VAE forward pass")
    encode_parser.add_argument("--splits", default="train", help="comma-separated splits to encode")
    encode_parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                               help="stored latent precision (float16 halves the size)")
    encode_parser.add_argument("--seed", type=int, default=0, help="seeds the crops and symmetries per sample key")
    encode_parser.add_argument("--overwrite", action="store_true", help="replace latent shards of another encode")
    encode_parser.add_argument("--partition", default=None,
                               help="I/N: encode only share I (0..N-1) of N of the pixel shards (times the processes "
                                    "of an `accelerate launch`); N alone takes I from $JOB_COMPLETION_INDEX")
    encode_parser.add_argument("--log_level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    return parser


def _encode_command(args: argparse.Namespace, extra: list[str]) -> int:
    from ctld.data.encode_latents import encode

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, extra) if args.config else build_config(parse_overrides(extra))
        partition = parse_partition(args.partition) if args.partition else None
        encode(Path(args.shards), Path(args.vae), Path(args.out), cfg, patches_per_volume=args.patches_per_volume,
               batch_size=args.batch_size, splits=tuple(s for s in args.splits.split(",") if s), dtype=args.dtype,
               seed=args.seed, overwrite=args.overwrite, partition=partition)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"ctld-shards encode: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ctld-shards build|inspect|verify|encode`; extra `--section.key=value` arguments override the config."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "encode":
        return _encode_command(args, extra)
    if args.command != "build":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        commands = {"inspect": inspect, "verify": verify, "merge": merge}
        try:
            return commands[args.command](Path(args.out))
        except (FileNotFoundError, ValueError) as error:
            print(f"ctld-shards {args.command}: error: {error}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # Bad arguments end in one line on stderr and exit code 2, never a traceback.
    if args.pairs:
        extra = [*extra, f"--shards.pairs={args.pairs}"]
    try:
        cfg = load_config(args.config, extra) if args.config else build_config(parse_overrides(extra))
        partition = parse_partition(args.partition) if args.partition else None
    except (ConfigError, ValueError) as error:
        print(f"ctld-shards build: error: {error}", file=sys.stderr)
        return 2
    missing = [source for source in args.sources if not Path(source).exists()]
    if missing:
        print(f"ctld-shards build: error: input {', '.join(missing)} does not exist; pass DICOM folders, ZIP files, "
              "NIfTI or cache files", file=sys.stderr)
        return 2
    return build(args.sources, cfg, Path(args.out or cfg.shards.out_dir), overwrite=args.overwrite,
                 partition=partition)


if __name__ == "__main__":
    sys.exit(main())
