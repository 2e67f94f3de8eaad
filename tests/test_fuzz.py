"""Issue 24: a seeded fuzz campaign through the real `ctld-shards build` and `ctld-infer`, called in-process.

Inputs are mutations of real files from ../shared/data: a real CT slice (pydicom's CT_small.dcm) made into series of
its own (new UIDs and positions, one per case) and a crop of the real TotalSegmentator chest CT written as NIfTI. A
case is one mutation, drawn from a seeded generator: truncation at a random offset, byte flips in the header, an
element rewritten with the wrong value representation, absurd dimensions, impossible geometry values, a required
element removed, NIfTI header fields set to absurd values, and dangling or looping symbolic links beside a series.

`ctld-shards build` reads `BUILD_BATCH` cases at a time next to one good DICOM series and one good NIfTI volume; a
case is handled when a warning names it with a reason (a skip) or it reached the shards (a harmless mutation). Every
`ctld-infer` case is handled when it ends in exit 0 or in exit 2 with one line on stderr. Counted against the
campaign: crashed (an exception out of `main`, another exit code, a traceback), hung (over the time limit; SIGALRM),
good data lost (a good input missing from a batch's shards, a clean input failing ctld-infer), and silently dropped
(a case neither named in a warning nor in the shards). The tally is printed and written to fuzz_tally.json in the
campaign's temporary folder. FUZZ_CASES (default 520) sets the size; a larger run is `FUZZ_CASES=5000 pytest
tests/test_fuzz.py`.

What it found (fixed with it): a NIfTI error with a newline (ctld-infer printed two lines), a NIfTI with a zero
dimension (IndexError in the builder), a RescaleIntercept of 1e12 (OverflowError), NumberOfFrames=1000000 (a million
planes planned from one file: minutes per build) and a symlink to the parent folder (every series read twice).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import signal
import struct
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA

from ctld.data import build_shards
from ctld.data.dicom import anon_id
from ctld.data.nifti import volume_ids, write_nifti
from ctld.data.shards import iter_samples
from ctld.data.volume import Volume
from ctld.inference import main as infer_main

SEED = 24
CASES = int(os.environ.get("FUZZ_CASES", "520"))
INFER_SHARE = 0.2  # of the cases go through ctld-infer, the rest through ctld-shards build
BUILD_BATCH = 25
SALT = "fuzz-salt"
BUILD_LIMIT_S, INFER_LIMIT_S = 120, 30
DICOM_SLICE = SHARED_DATA / "pydicom_ct_singles/pydicom/src/pydicom/data/test_files/CT_small.dcm"
CHEST_NIFTI = SHARED_DATA / "totalsegmentator_ct/tests/reference_files/pulmonary_report/models/ct_cropped.nii.gz"
# DICOM series of 1 mm (build) or 7.5 mm (infer); crops of 32x32 (build) and 16x16 (infer: one tile of the tiny
# export, so each case runs in a fraction of a second)
THIN_SLICES, THICK_SLICES, BUILD_CROP, INFER_CROP = 10, 4, 32, 16


class Hung(Exception):
    """Raised by SIGALRM in a call that ran past its limit."""


def _alarm(signum, frame):
    raise Hung()


# ------------------------------------------------------------------------------------------------ clean inputs


UID_PREFIX = "1.2.826.0.1.3680043.8.498.24"  # a test root; each case's UIDs end in its 4-digit slot
SLOT = "9876"  # the slot in the templates, replaced byte for byte (same length: no length field changes)


@functools.lru_cache(maxsize=4)
def _series_template(spacing_mm: float, slices: int, crop: int) -> tuple[bytes, ...]:
    """The files of a series of the real CT slice: crops (so each case is fast) whose structure changes along z,
    positions stepping `spacing_mm` along the normal, UIDs and PatientID ending in SLOT. Written with pydicom once;
    cases copy the bytes with their own slot (pydicom's writer would take most of the campaign's time)."""
    ds = pydicom.dcmread(DICOM_SLICE)
    pixels = ds.pixel_array
    z0 = float(ds.ImagePositionPatient[2])
    files = []
    for k in range(slices):
        cropped = np.roll(pixels, 3 * k, axis=1)[40 : 40 + crop, 40 : 40 + crop]
        ds.PixelData = np.ascontiguousarray(cropped).tobytes()
        ds.Rows = ds.Columns = crop
        ds.SeriesInstanceUID = f"{UID_PREFIX}.1.{SLOT}"
        # A study and frame of reference per case too: a series that loses its UID is grouped by them (and a
        # patient's); shared ones would merge two such cases into one series, which no real archive does.
        ds.StudyInstanceUID = f"{UID_PREFIX}.3.{SLOT}"
        ds.FrameOfReferenceUID = f"{UID_PREFIX}.4.{SLOT}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_PREFIX}.2.{SLOT}.{k}"
        ds.PatientID = f"FUZZ-{SLOT}"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z0 + k * spacing_mm]
        ds.SliceThickness = spacing_mm
        buffer = io.BytesIO()
        ds.save_as(buffer)
        raw = buffer.getvalue()
        assert raw.count(SLOT.encode()) == 6, "the slot must occur only in the UIDs and PatientID"
        files.append(raw)
    return tuple(files)


def _dicom_series(folder: Path, slot: int, *, spacing_mm: float, slices: int, crop: int = BUILD_CROP) -> str:
    """Write a series of `_series_template` with its own UIDs and patient (`slot`, 0-9999); returns its
    SeriesInstanceUID."""
    folder.mkdir(parents=True)
    for k, raw in enumerate(_series_template(spacing_mm, slices, crop)):
        (folder / f"slice{k:03d}.dcm").write_bytes(raw.replace(SLOT.encode(), f"{slot:04d}".encode()))
    return f"{UID_PREFIX}.1.{slot:04d}"


@functools.lru_cache(maxsize=1)
def _chest() -> Volume:
    from ctld.data.nifti import read_nifti

    return read_nifti(CHEST_NIFTI)


def _chest_crop(depth: int, spacing_mm: float, crop: int = BUILD_CROP) -> Volume:
    chest = _chest()
    hu = chest.hu[40 : 40 + depth, 30 : 30 + crop, 40 : 40 + crop].copy()
    return Volume(hu, (spacing_mm, *chest.spacing_mm[1:]), chest.origin_mm, chest.direction)


# ------------------------------------------------------------------------------------------------ mutations


def _pixel_data_offset(raw: bytes) -> int:
    at = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, little endian
    return at if at > 0 else len(raw)


def _truncate(rng, paths):
    for path in rng.choice(paths, size=int(rng.integers(1, len(paths) + 1)), replace=False):
        raw = path.read_bytes()
        path.write_bytes(raw[: int(rng.integers(0, len(raw)))])
    return "truncated"


def _flip_header(rng, paths):
    for path in rng.choice(paths, size=min(len(paths), int(rng.integers(1, 4))), replace=False):
        raw = bytearray(path.read_bytes())
        end = _pixel_data_offset(bytes(raw)) if path.suffix == ".dcm" else min(len(raw), 352)
        for offset in rng.integers(0, max(end, 1), size=int(rng.integers(1, 9))):
            raw[int(offset)] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(raw))
    return "header byte flips"


def _flip_pixels(rng, paths):
    path = paths[int(rng.integers(len(paths)))]
    raw = bytearray(path.read_bytes())
    start = _pixel_data_offset(bytes(raw)) + 12
    for offset in rng.integers(start, len(raw), size=16):
        raw[int(offset)] ^= 0xFF
    path.write_bytes(bytes(raw))
    return "pixel byte flips"


def _edit(rng, paths, change, every: bool):
    chosen = paths if every else [paths[int(rng.integers(len(paths)))]]
    for path in chosen:
        with pydicom.config.disable_value_validation():
            ds = pydicom.dcmread(path)
            change(ds)
            ds.save_as(path)


# Value representations written over an element's own in the explicit-VR file: the short-length ones keep the file
# parseable with a wrong reading of the value; OB, SQ and UN take a 4-byte length and derail what follows.
WRONG_VRS = [b"US", b"SS", b"UL", b"DS", b"IS", b"LO", b"UI", b"AT", b"FL", b"FD", b"CS", b"DA", b"OB", b"SQ", b"UN"]
VR_TARGETS = ["Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope",
              "RescaleIntercept", "BitsAllocated", "BitsStored", "PixelRepresentation", "SliceThickness", "Modality",
              "SeriesInstanceUID", "SamplesPerPixel", "SpecificCharacterSet", "PixelData"]


def _wrong_vr(rng, paths):
    keyword = VR_TARGETS[int(rng.integers(len(VR_TARGETS)))]
    vr = WRONG_VRS[int(rng.integers(len(WRONG_VRS)))]
    tag = pydicom.datadict.tag_for_keyword(keyword)
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    chosen = paths if rng.integers(2) else [paths[int(rng.integers(len(paths)))]]
    for path in chosen:
        raw = bytearray(path.read_bytes())
        at = raw.find(needle, 132)
        if at >= 0:
            raw[at + 4 : at + 6] = vr
            path.write_bytes(bytes(raw))
    return f"{keyword} as {vr.decode()}"


ABSURD = {"Rows": [0, 1, 65535], "Columns": [0, 3, 65535], "BitsAllocated": [1, 7, 64], "BitsStored": [0, 40],
          "SamplesPerPixel": [0, 3], "NumberOfFrames": [0, 1000000], "HighBit": [99], "PixelRepresentation": [7]}


def _absurd_dims(rng, paths):
    keyword = list(ABSURD)[int(rng.integers(len(ABSURD)))]
    value = ABSURD[keyword][int(rng.integers(len(ABSURD[keyword])))]
    _edit(rng, paths, lambda ds: setattr(ds, keyword, value), bool(rng.integers(2)))
    return f"{keyword}={value}"


GEOMETRY = {"PixelSpacing": [[0, 0], [-1, 1], ["nan", 1], [1e30, 1e30]],
            "ImageOrientationPatient": [[0] * 6, [1, 0, 0, 1, 0, 0], ["nan"] * 6, [2, 0, 0, 0, 2, 0]],
            "ImagePositionPatient": [["nan", 0, 0], [0, 0, "inf"], [0, 0]], "RescaleSlope": ["inf", 0, -1e30],
            "RescaleIntercept": ["nan", 1e12], "SliceThickness": [0, -5, "nan"]}


def _bad_geometry(rng, paths):
    keyword = list(GEOMETRY)[int(rng.integers(len(GEOMETRY)))]
    value = GEOMETRY[keyword][int(rng.integers(len(GEOMETRY[keyword])))]
    _edit(rng, paths, lambda ds: setattr(ds, keyword, value), bool(rng.integers(2)))
    return f"{keyword}={value}"


REQUIRED = ["PixelData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "BitsAllocated",
            "RescaleSlope", "Modality", "SeriesInstanceUID", "PatientID"]


def _drop_element(rng, paths):
    keyword = REQUIRED[int(rng.integers(len(REQUIRED)))]
    _edit(rng, paths, lambda ds: delattr(ds, keyword) if keyword in ds else None, bool(rng.integers(2)))
    return f"no {keyword}"


def _symlinks(rng, paths):
    folder = paths[0].parent
    kind = int(rng.integers(3))
    if kind == 0:
        (folder / "dangling.dcm").symlink_to(folder / "no_such_file.dcm")
    elif kind == 1:
        (folder / "loop").symlink_to("..", target_is_directory=True)
    else:
        (folder / "a.dcm").symlink_to(folder / "b.dcm")
        (folder / "b.dcm").symlink_to(folder / "a.dcm")
    return ["dangling symlink", "symlink loop to the parent", "cycle of symlinks"][kind]


DICOM_MUTATIONS = [_truncate, _flip_header, _flip_pixels, _wrong_vr, _absurd_dims, _bad_geometry, _drop_element,
                   _symlinks]

# NIfTI-1 header fields (offset, struct format): dim int16[8] at 40, datatype 70, bitpix 72, pixdim float32[8] at 76,
# vox_offset 108, scl_slope 112, scl_inter 116, qform_code 252, sform_code 254, srow_x/y/z float32[4] at 280-324,
# magic at 344.
NIFTI_FIELDS = {
    "dim0": (40, "<h", [0, 2, 8, -1]), "dim1": (42, "<h", [0, -3, 32767]), "dim3": (46, "<h", [0, 1, 32767]),
    "datatype": (70, "<h", [0, 1, 128, 511, 1234, 64]), "bitpix": (72, "<h", [0, 3, 128]),
    "pixdim1": (80, "<f", [0.0, -1.0, float("nan"), float("inf")]), "pixdim3": (88, "<f", [0.0, 1e-30, float("nan")]),
    "vox_offset": (108, "<f", [-1.0, 1e9, float("nan"), 3.0]),
    "scl_slope": (112, "<f", [float("nan"), 1e30, float("inf")]), "scl_inter": (116, "<f", [float("inf"), 1e38]),
    "qform_code": (252, "<h", [0, 99]), "sform_code": (254, "<h", [0, 7]),
    "srow_x1": (284, "<f", [0.9, float("nan"), 0.0]), "srow_y2": (308, "<f", [0.4, 0.0]), "srow_z0": (312, "<f", [0.3]),
    "magic": (344, "4s", [b"ni1\x00", b"\x00\x00\x00\x00", b"n+2\x00"]),
}


def _nifti_field(rng, paths):
    path = paths[0]
    name = list(NIFTI_FIELDS)[int(rng.integers(len(NIFTI_FIELDS)))]
    offset, fmt, values = NIFTI_FIELDS[name]
    value = values[int(rng.integers(len(values)))]
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))
    return f"NIfTI {name}={value!r}"


NIFTI_MUTATIONS = [_truncate, _flip_header, _nifti_field, _nifti_field, _symlinks]


def _make_case(rng, root: Path, index: int, *, fmt: str, infer: bool) -> dict:
    """Write case `index` (a clean input of its own, then one mutation) under root/caseNNNN."""
    folder = root / f"case{index:04d}"
    if fmt == "dicom":
        spacing, slices, crop = (7.5, THICK_SLICES, INFER_CROP) if infer else (1.0, THIN_SLICES, BUILD_CROP)
        uid = _dicom_series(folder, index, spacing_mm=spacing, slices=slices, crop=crop)
        paths = sorted(folder.glob("*.dcm"))
        mutation = DICOM_MUTATIONS[int(rng.integers(len(DICOM_MUTATIONS)))]
        return {"index": index, "fmt": fmt, "path": folder, "what": mutation(rng, paths),
                "series_id": anon_id(f"uid:{uid}", SALT, "series")}
    folder.mkdir(parents=True)
    suffix = ".nii.gz" if rng.integers(4) == 0 else ".nii"
    volume = _chest_crop(THICK_SLICES, 7.5, INFER_CROP) if infer else _chest_crop(20, 1.5)
    path = write_nifti(volume, folder / f"ct{suffix}")
    mutation = NIFTI_MUTATIONS[int(rng.integers(len(NIFTI_MUTATIONS)))]
    if suffix == ".nii.gz" and mutation is _nifti_field:
        mutation = _truncate  # header fields of a compressed file are not at fixed offsets
    what = mutation(rng, [path])
    return {"index": index, "fmt": fmt, "path": path if infer else folder, "what": f"{suffix}: {what}",
            "series_id": volume_ids(path, f"{folder.name}/{path.name}", SALT)[1]}


# ------------------------------------------------------------------------------------------------ the campaign


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _series_ids(out: Path) -> list[str]:
    return [sample["meta"]["series_id"] for sample in iter_samples(sorted(str(p) for p in out.glob("*.tar")))]


def _run_build_batch(cases: list[dict], good: list[Path], good_ids: set[str], batch_dir: Path, tally: Counter,
                     outcomes: list) -> None:
    records = _Records()
    root_logger = logging.getLogger()
    root_logger.addHandler(records)
    previous_level = root_logger.level
    root_logger.setLevel(min(previous_level or logging.WARNING, logging.WARNING))
    sources = [*good, batch_dir / "in"]  # one folder of case folders: log lines and ids name caseNNNN/...
    out = batch_dir / "shards"
    signal.setitimer(signal.ITIMER_REAL, BUILD_LIMIT_S)
    try:
        code = build_shards.main(["build", *map(str, sources), "--out", str(out), f"--shards.salt={SALT}",
                                  "--shards.num_workers=1", "--shards.max_skipped_fraction=1.0",
                                  "--shards.val_fraction=0", "--shards.test_fraction=0", "--log_level=WARNING"])
        failure = None if code == 0 else f"exit code {code}"
    except Hung:
        failure = "hung"
    except BaseException:  # noqa: BLE001 - a crash is what this campaign counts
        failure = traceback.format_exc(limit=-12)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        root_logger.removeHandler(records)
        root_logger.setLevel(previous_level)
    if failure is not None:
        key = "hung" if failure == "hung" else "crashed"
        tally[key] += len(cases)
        outcomes.extend({"case": c["index"], "what": c["what"], "outcome": key, "detail": failure} for c in cases)
        return
    ids = _series_ids(out)
    tally["good data lost"] += len(good_ids - set(ids))
    unknown = len([i for i in ids if i not in good_ids and i not in {c["series_id"] for c in cases}])
    missing = []
    for case in cases:
        label = f"case{case['index']:04d}"
        named = [line for line in records.lines if label in line and "(" in line]
        if case["series_id"] in ids:
            outcome, detail = "read", "in the shards"
        elif named:
            outcome, detail = "skipped", named[0][:200]
        else:
            missing.append(case)
            continue
        tally["handled"] += 1
        tally[outcome] += 1
        outcomes.append({"case": case["index"], "what": case["what"], "outcome": outcome, "detail": detail})
    # A mutated UID reads as a series of another id: samples of unknown ids account for that many missing cases.
    for number, case in enumerate(missing):
        outcome = "read" if number < unknown else "silently dropped"
        tally[outcome] += 1
        tally["handled"] += outcome == "read"
        outcomes.append({"case": case["index"], "what": case["what"], "outcome": outcome, "detail": "another id"})


def _drop_stale_log_handlers() -> None:
    """Remove log handlers left on closed streams: a CLI's logging.basicConfig in an earlier test (and nibabel's own
    handler, made at its import) bound one to a captured stderr pytest has closed since, and every later record
    would print a "Logging error" traceback. A user's process has no such handlers."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)


def _run_infer_case(case: dict, export: Path, out_dir: Path, capsys) -> tuple[str, str]:
    capsys.readouterr()
    _drop_stale_log_handlers()
    signal.setitimer(signal.ITIMER_REAL, INFER_LIMIT_S)
    try:
        out = out_dir / f"out{case['index']}"
        code = infer_main([str(case["path"]), "--checkpoint", str(export), "--out", str(out),
                           "--format", "nifti", "--no_progress", "--spacing_tolerance=-1",
                           "--allow_out_of_distribution"])
    except Hung:
        return "hung", ""
    except BaseException:  # noqa: BLE001 - a crash is what this campaign counts
        return "crashed", traceback.format_exc(limit=-4)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    err = capsys.readouterr().err.strip()
    if code == 0:
        return "read", "exit 0"
    # Log lines (a decoder's own warnings) may come before it: the refusal itself is one line.
    errors = [line for line in err.splitlines() if line.startswith("ctld-infer: error:")]
    if code == 2 and len(errors) == 1 and errors[0] == err.splitlines()[-1] and "Traceback" not in err:
        return "refused", errors[0][:200]
    return "crashed", f"exit {code}: {err[-300:]}"


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, shared_ct, infer_tiny_export):
    for needed in (DICOM_SLICE, CHEST_NIFTI):
        if not needed.is_file():
            pytest.skip(f"fuzz base file {needed} not found")
    root = tmp_path_factory.mktemp("fuzz")
    _drop_stale_log_handlers()
    previous = signal.signal(signal.SIGALRM, _alarm)
    rng = np.random.default_rng(SEED)
    tally: Counter = Counter()
    outcomes: list[dict] = []
    good_dir = root / "good"
    good_uid = _dicom_series(good_dir / "dicom", 9998, spacing_mm=1.0, slices=THIN_SLICES)
    good_nifti = write_nifti(_chest_crop(20, 1.5), good_dir / "nifti" / "chest.nii.gz")
    good_ids = {anon_id(f"uid:{good_uid}", SALT, "series"), volume_ids(good_nifti, "nifti/chest.nii.gz", SALT)[1]}
    n_infer = int(CASES * INFER_SHARE)
    n_build = CASES - n_infer
    try:
        for start in range(0, n_build, BUILD_BATCH):
            batch_dir = root / f"build{start:05d}"
            cases = [_make_case(rng, batch_dir / "in", index, fmt="dicom" if rng.integers(5) < 3 else "nifti",
                                infer=False) for index in range(start, min(start + BUILD_BATCH, n_build))]
            tally["tried"] += len(cases)
            _run_build_batch(cases, [good_dir], good_ids, batch_dir, tally, outcomes)
        infer_dir = root / "infer"
        infer_cases = [_make_case(rng, infer_dir / "in", n_build + i, fmt="dicom" if rng.integers(2) else "nifti",
                                  infer=True) for i in range(n_infer)]
        clean = write_nifti(_chest_crop(THICK_SLICES, 7.5, INFER_CROP), infer_dir / "clean.nii")
        clean_dicom = infer_dir / "clean_dicom"
        _dicom_series(clean_dicom, 9999, spacing_mm=7.5, slices=THICK_SLICES, crop=INFER_CROP)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {"root": root, "tally": tally, "outcomes": outcomes, "infer_cases": infer_cases,
            "clean_inputs": [clean, clean_dicom], "export": infer_tiny_export}


def test_fuzz_campaign(campaign, capsys):
    """Build and infer outcomes of every case; then the tally: nothing crashed, hung, lost or dropped silently."""
    tally, outcomes = campaign["tally"], campaign["outcomes"]
    infer_dir = campaign["root"] / "infer" / "out"
    infer_dir.mkdir(parents=True)
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in campaign["infer_cases"]:
            tally["tried"] += 1
            outcome, detail = _run_infer_case(case, campaign["export"], infer_dir, capsys)
            tally[outcome] += 1
            tally["handled"] += outcome in ("read", "refused")
            outcomes.append({"case": case["index"], "what": case["what"], "outcome": outcome, "detail": detail})
        # Good data through ctld-infer after every mutated case: the clean inputs still run.
        for index, clean in enumerate(campaign["clean_inputs"]):
            outcome, detail = _run_infer_case({"path": clean, "index": f"clean{index}"}, campaign["export"],
                                              infer_dir, capsys)
            tally["good data lost"] += outcome != "read"
            assert outcome == "read", (clean, detail)
    finally:
        signal.signal(signal.SIGALRM, previous)
    summary = {key: tally[key] for key in ("tried", "handled", "read", "skipped", "refused", "crashed", "hung",
                                           "good data lost", "silently dropped")}
    (campaign["root"] / "fuzz_tally.json").write_text(json.dumps({"summary": summary, "cases": outcomes}, indent=1,
                                                                 default=str))
    with capsys.disabled():
        print(f"\nfuzz campaign (seed {SEED}): {summary}")
        reasons = Counter(o["detail"].split("(")[1].split(")")[0] if o["outcome"] == "skipped" and "(" in o["detail"]
                          else o["outcome"] for o in outcomes)
        print(f"outcomes: {dict(reasons.most_common())}")
    bad = [o for o in outcomes if o["outcome"] in ("crashed", "hung", "silently dropped")]
    assert not bad, bad[:10]
    assert summary["tried"] >= min(CASES, 500) and summary["handled"] == summary["tried"]
    assert summary["good data lost"] == 0
