"""Issue 15: a bad-input campaign through the real `ctld-shards build`.

Mutated DICOM series (truncated pixel data, wrong transfer syntax, absurd Rows/Columns, missing positions, NaN
spacing, ...) and mutated ZIPs (traversal, bombs, duplicates, `./` members, a file beside a folder of the same name)
are built next to one good series. Each build must end with exit code 0, the good series in the shards, the bad
input named in a logged skip with its reason, and no traceback. Configs with wrong types and missing inputs end in
one line on stderr and exit code 2. Seeded (the mutations are fixed) and small: the whole file runs in ~30 s on 2
cores. The tally (tried / handled with a reason / crashed / lost) is printed and written to bad_input_tally.json in
the test's temporary folder.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import REPO_ROOT, write_synthetic_study

from ctld.data import build_shards

SALT = "bad-input-salt"
TALLY: dict[str, dict] = {}  # input name -> {"kind", "outcome", "detail"}


# ------------------------------------------------------------------------------------------------ inputs


def _series(root: Path, name: str, seed: int) -> Path:
    """A fresh thin DICOM series (47 slices of 16x16) in root/name/name, so log lines (paths relative to the
    source root/name) name it; returns the series folder."""
    study = write_synthetic_study(root / name, "other", size=16, seed=seed)
    return study["dirs"]["thin"].rename(root / name / name)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _edit(path: Path, change) -> None:
    with pydicom.config.disable_value_validation():  # write what a broken exporter writes
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


def _truncate_pixels(folder: Path) -> None:
    path = _files(folder)[10]
    path.write_bytes(path.read_bytes()[:-100])  # PixelData is the last element: cut into it


def _truncate_every_file(folder: Path) -> None:
    for path in _files(folder):
        path.write_bytes(path.read_bytes()[:600])  # header only, no pixel data at all


def _declare_syntax(path: Path, uid: str) -> None:
    """Rewrite only the file meta's TransferSyntaxUID (pydicom refuses to write raw pixels as compressed)."""
    raw = path.read_bytes()
    group_length = struct.unpack_from("<I", raw, 140)[0]  # (0002,0000) UL right after preamble + "DICM"
    body = raw[144 + group_length :]
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = uid
    buffer = io.BytesIO()
    buffer.write(raw[:132])
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)


def _wrong_syntax(folder: Path) -> None:
    for path in _files(folder):
        _declare_syntax(path, pydicom.uid.JPEG2000Lossless)  # raw pixels declared as JPEG 2000


def _bogus_syntax(folder: Path) -> None:
    for path in _files(folder):
        _declare_syntax(path, "1.2.3.4.5.6.7")


def _absurd_size(folder: Path) -> None:
    def change(ds):
        ds.Rows, ds.Columns = 65535, 65535

    for path in _files(folder):
        _edit(path, change)


def _zero_size(folder: Path) -> None:
    def change(ds):
        ds.Rows = 0

    for path in _files(folder):
        _edit(path, change)


def _missing_position(folder: Path) -> None:
    def change(ds):
        del ds.ImagePositionPatient

    for path in _files(folder)[::2]:
        _edit(path, change)


def _missing_all_positions(folder: Path) -> None:
    def change(ds):
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient

    for path in _files(folder):
        _edit(path, change)


def _nan_spacing(folder: Path) -> None:
    def change(ds):
        ds.PixelSpacing = ["nan", "nan"]

    for path in _files(folder):
        _edit(path, change)


def _zero_spacing(folder: Path) -> None:
    def change(ds):
        ds.PixelSpacing = [0, -1]

    for path in _files(folder):
        _edit(path, change)


def _garbage_values(folder: Path) -> None:
    def change(ds):
        ds.add_new(0x00180050, "LO", "abc")  # SliceThickness, not a number (written as text: DS refuses it)
        ds.add_new(0x00281053, "LO", "inf")  # RescaleSlope

    for path in _files(folder):
        _edit(path, change)


def _random_bytes(folder: Path) -> None:
    rng = np.random.default_rng(15)
    for path in _files(folder)[:5]:
        data = bytearray(path.read_bytes())
        for index in rng.integers(132, len(data), size=40):  # after the preamble + "DICM"
            data[index] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
    (folder / "empty.dcm").write_bytes(b"")


DICOM_MUTATIONS = {
    "truncated_pixel_data": _truncate_pixels,
    "no_pixel_data": _truncate_every_file,
    "jpeg2000_syntax_on_raw_pixels": _wrong_syntax,
    "unknown_transfer_syntax": _bogus_syntax,
    "absurd_rows_columns": _absurd_size,
    "zero_rows": _zero_size,
    "missing_position_half": _missing_position,
    "missing_position_all": _missing_all_positions,
    "nan_pixel_spacing": _nan_spacing,
    "zero_negative_pixel_spacing": _zero_spacing,
    "garbage_thickness_and_slope": _garbage_values,
    "random_bytes_and_empty_file": _random_bytes,
}


def _zip_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path


def _series_members(folder: Path, prefix: str) -> list[tuple[str, bytes]]:
    return [(f"{prefix}/{p.name}", p.read_bytes()) for p in _files(folder)]


def _understated_bomb(path: Path) -> Path:
    """A member of 8 MiB of zeros whose headers claim 1 KiB (a bomb that lies about its size)."""
    _zip_of(path, [("bomb.dcm", bytes(8 << 20))])
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 1024)
    struct.pack_into("<I", data, central + 24, 1024)
    path.write_bytes(bytes(data))
    return path


def _make_zips(root: Path, donor: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (zip path, whether a good series inside it must survive)."""
    good = _series_members(donor, "series")
    zips = {
        "zip_traversal": (_zip_of(root / "traversal.zip", [*good, ("../x.dcm", b"x")]), False),
        "zip_absolute": (_zip_of(root / "absolute.zip", [("/etc/x.dcm", b"x")]), False),
        "zip_bomb_declared": (_zip_of(root / "bomb.zip", [("bomb.dcm", bytes(8 << 20))]), False),
        "zip_bomb_understated": (_understated_bomb(root / "liar.zip"), False),
        "zip_duplicate_names": (_zip_of(root / "dup.zip", [("a.dcm", b"1"), ("a.dcm", b"2")]), False),
        "zip_dot_member": (_zip_of(root / "dot.zip", [("./", b""), *good]), True),
        "zip_file_folder_clash": (_zip_of(root / "clash.zip", [("series", b"junk"), *good]), True),
        "zip_not_a_zip": (root / "fake.zip", False),
        "zip_truncated": (root / "cut.zip", False),
    }
    (root / "fake.zip").write_bytes(b"PK\x03\x04 not really a zip")
    whole = _zip_of(root / "whole.zip", good).read_bytes()
    (root / "cut.zip").write_bytes(whole[: len(whole) // 2])
    (root / "whole.zip").unlink()
    return zips


# ------------------------------------------------------------------------------------------------ campaign


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _samples(out: Path) -> int:
    count = 0
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            count += sum(1 for m in tar if m.name.endswith(".json"))
    return count


def _build(sources: list[Path], out: Path, *extra: str) -> int:
    return build_shards.main(["build", *map(str, sources), "--out", str(out), f"--shards.salt={SALT}",
                              "--shards.num_workers=1", "--shards.max_skipped_fraction=0.9",
                              "--shards.max_archive_bytes=4000000", *extra])


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    good = _series(root, "good", seed=1).parent
    inputs: dict[str, tuple[Path, str, int]] = {}  # name -> (source, kind, samples the input itself must give)
    for seed, (name, mutate) in enumerate(DICOM_MUTATIONS.items(), start=100):
        folder = _series(root, name, seed)
        mutate(folder)
        inputs[name] = (folder.parent, "dicom", 0)
    donor = _series(root, "donor", seed=7)
    for name, (path, keeps) in _make_zips(root, donor).items():
        inputs[name] = (path, "zip", 1 if keeps else 0)
    return {"root": root, "good": good, "inputs": inputs}


def _run_one(name, campaign, caplog, capsys) -> dict:
    """Build good series + one bad input; classify the outcome."""
    source, kind, own_samples = campaign["inputs"][name]
    out = campaign["root"] / f"out_{name}"
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            code = _build([campaign["good"], source], out)
    except BaseException as error:  # noqa: BLE001 - a crash is what this campaign counts
        return {"kind": kind, "outcome": "crashed", "detail": f"{type(error).__name__}: {error}"}
    err = capsys.readouterr().err
    if code != 0 or "Traceback" in err:
        return {"kind": kind, "outcome": "crashed", "detail": f"exit {code}: {err[-500:]}"}
    samples = _samples(out)
    if samples < 1 + own_samples:
        return {"kind": kind, "outcome": "lost", "detail": f"{samples} samples, expected {1 + own_samples}"}
    # A named skip: a warning that names the input (its folder or ZIP) and gives a reason.
    label = source.name
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    named = [line for line in lines if label in line and "skipped" in line]
    manifest = _manifest(out)
    if not named:
        return {"kind": kind, "outcome": "unnamed", "detail": f"no warning names {label}: {lines[:5]}; "
                f"manifest skipped {manifest['skipped_counts']}, files {manifest['files_skipped']}"}
    return {"kind": kind, "outcome": "handled", "detail": named[0][:300]}


ALL_INPUTS = [*DICOM_MUTATIONS, "zip_traversal", "zip_absolute", "zip_bomb_declared", "zip_bomb_understated",
              "zip_duplicate_names", "zip_dot_member", "zip_file_folder_clash", "zip_not_a_zip", "zip_truncated"]


@pytest.mark.parametrize("name", ALL_INPUTS)
def test_bad_input_is_a_named_skip_and_loses_nothing(name, campaign, caplog, capsys):
    result = _run_one(name, campaign, caplog, capsys)
    TALLY[name] = result
    assert result["outcome"] == "handled", f"{name}: {result['outcome']}: {result['detail']}"


def test_all_bad_inputs_together_through_the_cli(campaign, tmp_path):
    """The real console script on every bad input at once next to the good series: exit 0, no traceback, and the
    good series plus the two ZIPs whose other members are fine end up in the shards."""
    sources = [campaign["good"], *(source for source, _, _ in campaign["inputs"].values())]
    out = tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, "-m", "ctld.data.build_shards", "build", *map(str, sources), "--out", str(out),
         f"--shards.salt={SALT}", "--shards.num_workers=2", "--shards.max_skipped_fraction=0.95",
         "--shards.max_archive_bytes=4000000"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    expected = 1 + sum(own for _, _, own in campaign["inputs"].values())
    assert _samples(out) == expected
    manifest = _manifest(out)
    assert manifest["samples"] == expected and manifest["archives_skipped"] >= 7


# ------------------------------------------------------------------------------------------------ arguments


CONFIG_CASES = {
    "factor_not_a_number": (["--data.factor=abc"], "data.factor' must be an integer"),
    "factor_a_list": (["--data.factor=[1,2]"], "data.factor' must be an integer"),
    "float_for_int": (["--shards.min_slices=2.5"], "must be an integer"),
    "bool_not_bool": (["--data.augment=maybe"], "must be true or false"),
    "choice_not_allowed": (["--shards.on_gantry_tilt=ignore"], "must be one of"),
    "unknown_key": (["--shards.saltt=x"], "did you mean 'shards.salt'"),
    "unknown_section": (["--shard.salt=x"], "unknown config key"),
    "override_without_value": (["--shards.salt"], "--section.key=value"),
    "yaml_list_for_int": (["--config", "{root}/list.yaml"], "must be an integer"),
    "yaml_not_a_mapping": (["--config", "{root}/scalar.yaml"], "must hold a mapping"),
    "yaml_broken": (["--config", "{root}/broken.yaml"], "is not valid YAML"),
    "yaml_unknown_key": (["--config", "{root}/unknown.yaml"], "did you mean"),
    "config_missing": (["--config", "{root}/nope.yaml"], "does not exist"),
    "input_missing": (["{root}/no_such_folder"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_arguments_give_one_line_and_exit_2(case, campaign, tmp_path, capsys):
    root = tmp_path
    (root / "list.yaml").write_text("data:\n  factor: [5, 5]\n")
    (root / "scalar.yaml").write_text("just text\n")
    (root / "broken.yaml").write_text("data: {factor: 5\n")
    (root / "unknown.yaml").write_text("shards:\n  max_archive_byte: 5\n")
    args, message = CONFIG_CASES[case]
    args = [a.format(root=root) for a in args]
    sources = [] if case == "input_missing" else [str(campaign["good"])]
    try:
        code = build_shards.main(["build", *sources, "--out", str(tmp_path / "out"), *args])
    except BaseException as error:  # noqa: BLE001
        TALLY[f"config:{case}"] = {"kind": "config", "outcome": "crashed", "detail": repr(error)}
        raise
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    ok = code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err
    TALLY[f"config:{case}"] = {"kind": "config", "outcome": "handled" if ok else "crashed",
                               "detail": f"exit {code}: {err.strip()[:300]}"}
    assert ok, (code, err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_tally_reports_tried_handled_crashed_lost(tmp_path_factory):
    """Runs last in this file: prints (pytest -s) and writes the campaign's figures."""
    tried = len(TALLY)
    counts = {outcome: sum(r["outcome"] == outcome for r in TALLY.values())
              for outcome in ("handled", "crashed", "lost", "unnamed")}
    tally = {"tried": tried, **counts, "inputs": TALLY}
    path = tmp_path_factory.getbasetemp() / "bad_input_tally.json"
    path.write_text(json.dumps(tally, indent=1, sort_keys=True))
    print(f"\nbad-input campaign: tried {tried}, handled with a reason {counts['handled']}, crashed "
          f"{counts['crashed']}, lost {counts['lost']}, unnamed {counts['unnamed']} ({path})")
    if tried < len(ALL_INPUTS) + len(CONFIG_CASES):
        pytest.skip("run the whole file for the tally")
    assert counts["crashed"] == 0 and counts["lost"] == 0 and counts["unnamed"] == 0
