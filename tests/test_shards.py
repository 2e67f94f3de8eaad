"""`ctld-shards build|inspect|verify` end to end on synthetic DICOM (tests/conftest.py) and the real CT files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import FACTOR, SHARDS_SALT, THICK_OFFSET, THIN_DEPTH

from ctld.data import build_shards
from ctld.data.dicom import anon_id
from ctld.data.salt import resolve_salt
from ctld.data.transforms import simulate_thick


def _samples(out: Path) -> dict[str, dict]:
    """Every sample of every shard, decoded with webdataset as the loader will."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()
    return {sample["__key__"]: sample | {"__url__": sample["__url__"]} for sample in dataset}


def _case(study: dict) -> str:
    return anon_id(study["patient"]["PatientID"], SHARDS_SALT, "patient")


def test_round_trip_arrays_geometry_pairs_and_splits(built_shards, synthetic_dicom):
    samples = _samples(built_shards)
    studies = synthetic_dicom["studies"]
    by_case = {s["json"]["case_id"]: s for s in samples.values()}
    assert set(by_case) == {_case(studies[k]) for k in ("pair", "thin", "zipped", "other")}  # "broken" skipped
    for key, study in studies.items():
        if key == "broken":
            continue
        sample = by_case[_case(study)]
        info = sample["json"]
        assert sample["__key__"] == f"{info['case_id']}_{info['series_id']}"
        assert sample["thin.npy"].dtype == np.int16 and sample["thick.npy"].dtype == np.int16
        np.testing.assert_array_equal(sample["thin.npy"], study["thin_hu"])
        assert info["format_version"] == 1 and info["factor"] == FACTOR
        assert info["thin_spacing_mm"] == pytest.approx([1.0, 0.7, 0.7])
        assert info["thick_spacing_mm"] == pytest.approx([5.0, 0.7, 0.7])
        assert info["thin_origin_mm"] == pytest.approx([-11.2, -11.2, -30.0])
        assert info["shape_thin"] == [THIN_DEPTH, 32, 32] and info["direction"] == np.eye(3).tolist()
        thick, offset = sample["thick.npy"], info["offset"]
        # docs/DESIGN.md: thick k covers thin [offset + k*f, offset + (k+1)*f), centred on those slices.
        expected = simulate_thick(sample["thin.npy"][offset:], FACTOR)[: thick.shape[0]]
        np.testing.assert_array_equal(thick, expected)
        z_centre = info["thin_origin_mm"][2] + offset + (FACTOR - 1) / 2
        assert info["thick_origin_mm"][2] == pytest.approx(z_centre)
        if key == "pair":
            assert (info["thick_source"], offset, thick.shape) == ("real", THICK_OFFSET, (9, 32, 32))
        else:
            assert (info["thick_source"], offset, thick.shape) == ("simulated", 0, (THIN_DEPTH // FACTOR, 32, 32))
        assert info["split"] == ("val" if key == "thin" else "train")
        assert Path(sample["__url__"]).name.startswith(info["split"] + "-")

    manifest = json.loads((built_shards / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert manifest["splits"]["train"]["samples"] == 3 and manifest["splits"]["val"]["samples"] == 1
    assert manifest["thick_source"] == {"real": 1, "simulated": 3}
    broken_id = anon_id(f"uid:{studies['broken']['uids']['thin_series']}", SHARDS_SALT, "series")
    assert manifest["skipped"] == [{"series_id": broken_id, "reason": "missing_slices", "files": THIN_DEPTH - 1}]
    assert manifest["geometry"]["thin_depth"] == {"min": 47.0, "median": 47.0, "max": 47.0}


def test_no_identifying_string_in_any_shard_byte_or_manifest(built_shards, synthetic_dicom):
    secrets_ = [SHARDS_SALT, "Synthetic General Hospital", "19700101", "studies.zip", "zipped", "broken"]
    for study in synthetic_dicom["studies"].values():
        secrets_ += [study["patient"]["PatientName"], study["patient"]["PatientID"], "SYNTH", *study["uids"].values()]
    files = [*built_shards.glob("*.tar"), built_shards / "manifest.json"]
    assert len(files) == 4
    blob = b"".join(path.read_bytes() for path in files)
    for secret in secrets_:
        for encoded in {secret.encode(), secret.upper().encode(), secret.replace("^", " ").encode()}:
            assert encoded not in blob, f"{secret!r} leaked into shards or manifest"
    assert not (built_shards / ".salt").exists()  # a configured salt is never written down


def test_random_salt_file_is_private_reused_and_outside_the_shard_folder(tmp_path, monkeypatch):
    """Issue 15: the default salt lives per user (XDG config folder), not in the shard folder users copy."""
    monkeypatch.delenv("CTLD_SALT", raising=False)
    monkeypatch.delenv("CTLD_SALT_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    out = tmp_path / "s"
    out.mkdir()
    salt = resolve_salt("", out)
    salt_file = tmp_path / "config" / "ctld" / "salt"
    assert salt_file.stat().st_mode & 0o777 == 0o600 and salt_file.read_text().strip() == salt
    assert list(out.iterdir()) == []
    assert resolve_salt("", out) == salt and len(salt) == 64
    assert resolve_salt("", tmp_path / "other") == salt  # every build of this user hashes alike
    monkeypatch.setenv("CTLD_SALT_FILE", str(tmp_path / "elsewhere" / "my.salt"))
    other = resolve_salt("", out)
    assert other != salt and (tmp_path / "elsewhere" / "my.salt").read_text().strip() == other


def test_legacy_salt_in_the_shard_folder_is_used_and_moved_out(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CTLD_SALT", raising=False)
    monkeypatch.setenv("CTLD_SALT_FILE", str(tmp_path / "user" / "salt"))
    out = tmp_path / "s"
    out.mkdir()
    (out / ".salt").write_text("legacy-salt-1234\n")
    assert resolve_salt("", out) == "legacy-salt-1234"  # reruns hash as before
    assert not (out / ".salt").exists() and (tmp_path / "user" / "salt").read_text().strip() == "legacy-salt-1234"
    assert "moved" in caplog.text and str(tmp_path / "user" / "salt") in caplog.text
    # A second legacy folder with another salt keeps its own (and is told to move it out).
    other = tmp_path / "t"
    other.mkdir()
    (other / ".salt").write_text("second-salt\n")
    assert resolve_salt("", other) == "second-salt" and (other / ".salt").exists()
    assert "differs" in caplog.text


def test_default_salt_never_lands_in_the_shard_folder(synthetic_dicom, tmp_path, monkeypatch):
    monkeypatch.delenv("CTLD_SALT", raising=False)
    monkeypatch.setenv("CTLD_SALT_FILE", str(tmp_path / "user" / "salt"))
    out = tmp_path / "shards"
    code = build_shards.main(["build", str(synthetic_dicom["studies"]["thin"]["dirs"]["thin"]), "--out", str(out),
                              "--shards.num_workers=1", "--log_level=ERROR"])
    assert code == 0
    salt = (tmp_path / "user" / "salt").read_text().strip().encode()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and not (out / ".salt").exists()
    for path in files:
        assert salt not in path.read_bytes(), path


def test_inspect_and_verify_name_corrupt_and_truncated_shards(built_shards, tmp_path, capsys):
    assert build_shards.main(["inspect", str(built_shards)]) == 0
    assert "train    2 shards      3 samples" in capsys.readouterr().out
    assert build_shards.main(["verify", str(built_shards)]) == 0
    assert "3 of 3 shards ok" in capsys.readouterr().out

    copy = tmp_path / "copy"
    shutil.copytree(built_shards, copy)
    data = (copy / "train-000001.tar").read_bytes()
    (copy / "train-000001.tar").write_bytes(data[: len(data) // 2])
    flipped = bytearray((copy / "val-000000.tar").read_bytes())
    flipped[2000] ^= 0xFF
    (copy / "val-000000.tar").write_bytes(bytes(flipped))
    assert build_shards.main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "BAD  train-000001.tar: size" in out and "BAD  val-000000.tar: sha256" in out
    assert "ok   train-000000.tar" in out


def test_rerun_is_a_no_op_and_other_settings_are_refused(make_shards, synthetic_dicom):
    out = make_shards("--shards.shard_max_samples=3")
    before = {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    argv = [
        "build",
        str(synthetic_dicom["root"]),
        "--out",
        str(out),
        f"--shards.salt={SHARDS_SALT}",
        "--shards.num_workers=1",
        "--log_level=ERROR",
        "--shards.shard_max_samples=3",
    ]
    assert build_shards.main(argv) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()} == before
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes  # nothing rewritten
    (out / "train-000000.tar").unlink()  # what `verify` advises for a bad shard: delete it and rerun
    assert build_shards.main(argv) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()} == before
    with pytest.raises(SystemExit, match="different build"):
        build_shards.main(argv[:-1] + ["--shards.shard_max_samples=1"])
    assert build_shards.main(argv[:-1] + ["--shards.shard_max_samples=1", "--overwrite"]) == 0
    assert len(list(out.glob("*.tar"))) == 4


def test_two_workers_equal_one_worker(make_shards, built_shards):
    two = make_shards(
        "--shards.val_fraction=0.3",
        "--shards.test_fraction=0.0",
        "--shards.shard_max_samples=2",
        "--shards.num_workers=2",
    )
    assert (two / "manifest.json").read_bytes() == (built_shards / "manifest.json").read_bytes()


def test_too_many_skipped_fails_but_writes_manifest(synthetic_dicom, tmp_path, capsys):
    argv = [
        "build",
        str(synthetic_dicom["root"]),
        "--out",
        str(tmp_path),
        f"--shards.salt={SHARDS_SALT}",
        "--shards.num_workers=1",
        "--log_level=ERROR",
        "--shards.max_skipped_fraction=0.1",
    ]
    assert build_shards.main(argv) == 1
    assert "max_skipped_fraction" in capsys.readouterr().err
    assert json.loads((tmp_path / "manifest.json").read_text())["skipped_counts"] == {"missing_slices": 1}


def test_killed_build_resumes_to_the_same_result(make_shards, synthetic_dicom, tmp_path):
    settings = ["--shards.shard_max_samples=1", "--shards.val_fraction=0.3", "--shards.test_fraction=0.0"]
    reference = make_shards(*settings)
    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "ctld.data.build_shards",
        "build",
        str(synthetic_dicom["root"]),
        "--out",
        str(out),
        f"--shards.salt={SHARDS_SALT}",
        "--shards.num_workers=1",
        "--log_level=ERROR",
        *settings,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(argv, env=env, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in out.glob("*.tar"))
    assert not (out / "manifest.json").exists() and 1 <= len(done) < 4, f"not interrupted mid-build: {done}"
    assert subprocess.run(argv, env=env, cwd=Path(__file__).resolve().parents[1]).returncode == 0
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    for shard in reference.glob("*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert not list(out.glob(".tmp-*"))


def test_nifti_cache_and_unsafe_zip_inputs(make_shards, tmp_path):
    from conftest import synthetic_ct

    from ctld.data.nifti import write_nifti
    from ctld.data.volume import Volume

    src = tmp_path / "src"
    src.mkdir()
    hu = synthetic_ct(20, 24, seed=5)
    write_nifti(Volume(hu, (1.25, 0.8, 0.8), (0, 0, 0), np.eye(3)), src / "case_a.nii.gz")
    np.save(src / "case_b.npy", hu[:, :16, :20])
    (src / "case_b.json").write_text(json.dumps({"spacing_mm": [1.0, 0.9, 0.9], "patient": "PATIENT-B"}))
    with tarfile.open(src / "not_a_zip.tar", "w"):
        pass
    import zipfile

    with zipfile.ZipFile(src / "evil.zip", "w") as archive:
        archive.writestr("../../escape.dcm", b"x")
    out = make_shards(sources=[src])
    samples = _samples(out)
    assert len(samples) == 2
    shapes = sorted(tuple(s["json"]["shape_thin"]) for s in samples.values())
    assert shapes == [(20, 16, 20), (20, 24, 24)]
    for sample in samples.values():
        assert sample["json"]["thick_source"] == "simulated" and sample["thick.npy"].shape[0] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["archives_skipped"] == 1 and not (tmp_path / "escape.dcm").exists()
    blob = b"".join(p.read_bytes() for p in [*out.glob("*.tar"), out / "manifest.json"])
    assert b"PATIENT-B" not in blob and b"case_a" not in blob


def test_real_ct_folder_builds_with_every_series_accounted_for(make_shards, shared_ct):
    out = make_shards("--shards.max_skipped_fraction=1.0", "--shards.num_workers=2", sources=[shared_ct])
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = manifest["skipped_counts"]
    assert reasons["gantry_tilt"] == 1 and reasons["missing_slices"] == 2
    assert reasons["too_few_slices"] >= 10 and reasons["duplicate_positions"] >= 1
    assert manifest["files_skipped"]["unsupported_transfer_syntax"] == 2
    assert manifest["files_skipped"] == {"not_dicom": 5, "unsupported_transfer_syntax": 2}  # PROVENANCE.txt files
    # Samples: the 20-slice empty-UID DICOM series (2 mm: thin) and the two 1.5 mm NIfTI volumes.
    assert manifest["samples"] == 3 and manifest["thick_source"] == {"simulated": 3}
    accounted = len(manifest["skipped"]) + manifest["samples"] + len(manifest["unused"])
    assert accounted == manifest["series_total"]
    samples = _samples(out)
    dicom_sample = next(s for s in samples.values() if s["json"]["shape_thin"] == [20, 512, 512])
    assert dicom_sample["json"]["thin_spacing_mm"][0] == pytest.approx(2.0)
    assert build_shards.main(["verify", str(out)]) == 0


def test_inplane_resampling_keeps_thick_and_thin_on_one_grid(make_shards, synthetic_dicom):
    out = make_shards("--shards.inplane_spacing_mm=1.4", "--shards.val_fraction=0.0", "--shards.test_fraction=0.0")
    samples = _samples(out)
    pair = next(s for s in samples.values() if s["json"]["thick_source"] == "real")
    info = pair["json"]
    assert pair["thin.npy"].shape == (THIN_DEPTH, 16, 16) and pair["thick.npy"].shape == (9, 16, 16)
    assert info["thin_spacing_mm"][1:] == pytest.approx([0.7 * 31 / 15] * 2)  # corners kept: 31 steps -> 15
    assert info["thick_spacing_mm"][1:] == info["thin_spacing_mm"][1:]
    # Resampling commutes with slab averaging up to rounding: the pair stays aligned.
    expected = simulate_thick(pair["thin.npy"][info["offset"] :].astype(np.float64), FACTOR)[:9]
    assert np.abs(pair["thick.npy"] - expected).max() <= 1.0


# ------------------------------------------------------------------------------------ partitions and merge (issue 25)

PARTITION_SETTINGS = ["--shards.val_fraction=0.3", "--shards.test_fraction=0.0", "--shards.shard_max_samples=2"]


def _build_partitions(source: Path, out: Path, count: int, *extra: str, indexes=None) -> None:
    for index in range(count) if indexes is None else indexes:
        argv = ["build", str(source), "--out", str(out), f"--shards.salt={SHARDS_SALT}", "--shards.num_workers=1",
                "--log_level=ERROR", *PARTITION_SETTINGS, "--partition", f"{index}/{count}", *extra]
        assert build_shards.main(argv) == 0


def _payloads(out: Path) -> dict[str, tuple[str, dict]]:
    """key -> (split, {member: bytes}) of every sample the manifest lists, read as the loader finds them."""
    from ctld.data.shards import manifest_shards
    from ctld.data.tar_reader import iter_raw_samples

    found = {}
    for split in ("train", "val", "test"):
        for url in manifest_shards(out, split):
            for raw in iter_raw_samples(url):
                assert raw["__key__"] not in found, f"{raw['__key__']} twice"
                found[raw["__key__"]] = (split, {k: v for k, v in raw.items() if not k.startswith("__")})
    return found


@pytest.fixture(scope="module")
def merged_shards(synthetic_dicom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("partitioned") / "shards"
    _build_partitions(synthetic_dicom["root"], out, 3)
    assert build_shards.main(["merge", str(out)]) == 0
    return out


def test_three_partitions_and_merge_equal_one_build(merged_shards, built_shards, synthetic_dicom, capsys):
    from ctld.data.shard_plan import partition_of

    whole, merged = _payloads(built_shards), _payloads(merged_shards)
    assert len(whole) == 4 and sorted(merged) == sorted(whole)
    for key, (split, members) in whole.items():
        assert merged[key][0] == split and merged[key][1] == members, key  # byte-identical sample payloads
    # Each partition holds exactly the patients its salted hash names; here more than one partition has samples.
    holders = set()
    for folder in merged_shards.glob("part-*-of-0003"):
        index = int(folder.name[5:9])
        for shard in folder.glob("*.tar"):
            for key in _samples_keys(shard):
                assert partition_of(key.split("_")[0], 3) == index
                holders.add(index)
    assert len(holders) >= 2
    one, three = (json.loads((d / "manifest.json").read_text()) for d in (built_shards, merged_shards))
    assert all(entry["name"].startswith("part-") for entry in three["shards"])
    assert three["partitions"]["count"] == 3
    for field in ("samples", "thick_source", "geometry", "hu", "series_total", "skipped", "skipped_counts", "unused",
                  "files_skipped", "settings", "factor"):
        assert three[field] == one[field], field
    assert {s: {k: v for k, v in i.items() if k != "shards"} for s, i in three["splits"].items()} == {
        s: {k: v for k, v in i.items() if k != "shards"} for s, i in one["splits"].items()}
    capsys.readouterr()
    assert build_shards.main(["verify", str(merged_shards)]) == 0
    assert "3 of 3 shards ok" in capsys.readouterr().out
    assert build_shards.main(["inspect", str(merged_shards)]) == 0
    assert "merged from 3 partitions" in capsys.readouterr().out
    # Privacy holds for every file a partitioned build writes (records included): no salt, no identifier.
    blob = b"".join(p.read_bytes() for p in merged_shards.rglob("*") if p.is_file())
    for study in synthetic_dicom["studies"].values():
        for secret in (SHARDS_SALT, study["patient"]["PatientID"], study["patient"]["PatientName"], "SYNTH",
                       *study["uids"].values()):
            assert secret.encode() not in blob, secret


def _samples_keys(shard: Path) -> list[str]:
    from ctld.data.tar_reader import iter_raw_samples

    return [raw["__key__"] for raw in iter_raw_samples(str(shard))]


def test_partition_from_the_indexed_job_environment(monkeypatch, capsys):
    from ctld.data.shard_plan import parse_partition

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert parse_partition("4") == (2, 4) and parse_partition("1/3") == (1, 3)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert build_shards.main(["build", "/nonexistent-but-unused", "--partition", "4"]) == 2
    assert "$JOB_COMPLETION_INDEX, which is not set" in capsys.readouterr().err
    assert build_shards.main(["build", ".", "--partition", "3/3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index must be in 0..2" in err


# `ctld-shards build` that SIGKILLs itself when it starts writing its second sample: a real kill, at a known point.
KILLED_ON_SECOND_SAMPLE = """
import os, signal, sys
from ctld.data import build_shards, shard_writer
real_add, added = shard_writer._ShardSink.add, []
def add(self, result):
    added.append(result)
    if len(added) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_add(self, result)
shard_writer._ShardSink.add = add
sys.exit(build_shards.main(sys.argv[1:]))
"""


def test_killed_partition_resumes_with_nothing_lost(merged_shards, synthetic_dicom, tmp_path):
    """Partition 2/3 holds two samples ("pair", "zipped"), one per shard here; SIGKILLed while writing the second,
    a rerun finishes it and the merged set equals the uninterrupted one."""
    out = tmp_path / "shards"
    _build_partitions(synthetic_dicom["root"], out, 3, "--shards.shard_max_samples=1", indexes=[0, 1])
    part = out / "part-0002-of-0003"
    args = ["build", str(synthetic_dicom["root"]), "--out", str(out), f"--shards.salt={SHARDS_SALT}",
            "--shards.num_workers=1", "--log_level=ERROR", *PARTITION_SETTINGS, "--shards.shard_max_samples=1",
            "--partition", "2/3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    repo = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", KILLED_ON_SECOND_SAMPLE, *args], env=env, cwd=repo)
    assert killed.returncode == -signal.SIGKILL
    complete = [p.name for p in part.glob("*.tar") if not p.name.startswith(".")]  # (glob matches .tmp-* too)
    assert complete == ["train-000000.tar"] and not (part / "partition.json").exists()
    assert build_shards.main(["merge", str(out)]) == 2  # incomplete: refused
    assert subprocess.run([sys.executable, "-m", "ctld.data.build_shards", *args], env=env, cwd=repo).returncode == 0
    complete = [p.name for p in part.glob("*.tar") if not p.name.startswith(".")]
    assert sorted(complete) == ["train-000000.tar", "train-000001.tar"] and not list(part.glob(".tmp-*"))
    assert build_shards.main(["merge", str(out)]) == 0
    assert _payloads(out) == _payloads(merged_shards)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_merge_refuses_incomplete_damaged_or_mismatched_partitions(merged_shards, synthetic_dicom, tmp_path,
                                                                    capsys):
    out = tmp_path / "shards"
    shutil.copytree(merged_shards, out)
    manifest = (out / "manifest.json").read_bytes()

    def refused(*expected: str) -> None:
        capsys.readouterr()
        assert build_shards.main(["merge", str(out)]) == 2
        err = _one_line_error(capsys)
        for text in expected:
            assert text in err, err
        assert (out / "manifest.json").read_bytes() == manifest, "a refused merge wrote the manifest"

    shutil.move(out / "part-0001-of-0003", tmp_path / "aside")
    refused("partition 1/3 is missing", "--partition 1/3")
    shutil.move(tmp_path / "aside", out / "part-0001-of-0003")
    (out / "part-0002-of-0003" / "partition.json").rename(tmp_path / "record.json")
    (out / "part-0000-of-0003" / "partition.json").write_text("{not json")
    refused("partition 0/3 is damaged", "partition 2/3 is incomplete")  # every problem, in one line
    (tmp_path / "record.json").rename(out / "part-0002-of-0003" / "partition.json")
    shutil.copy(merged_shards / "part-0000-of-0003" / "partition.json", out / "part-0000-of-0003")
    shard = out / "part-0002-of-0003" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    refused("partition 2/3 is damaged", "train-000000.tar 1000 bytes")
    shutil.copy(merged_shards / "part-0002-of-0003" / "train-000000.tar", shard)
    assert build_shards.main(["merge", str(out)]) == 0 and (out / "manifest.json").read_bytes() == manifest

    # Partition 1 rebuilt with another salt, then with another setting: refused by hash, the salt never shown.
    other = ["build", str(synthetic_dicom["root"]), "--out", str(out), "--shards.num_workers=1", "--log_level=ERROR",
             *PARTITION_SETTINGS, "--partition", "1/3", "--overwrite"]
    assert build_shards.main([*other, "--shards.salt=another-salt-77"]) == 0
    refused("partition 1/3 was built with another salt")
    record = (out / "part-0001-of-0003" / "partition.json").read_text()
    assert "another-salt-77" not in record and SHARDS_SALT not in record
    assert build_shards.main([*other, f"--shards.salt={SHARDS_SALT}", "--shards.min_slices=4"]) == 0
    refused("partition 1/3 was built with other settings", "min_slices")
    # ... and from other inputs (one study folder instead of the whole set).
    other[1] = str(synthetic_dicom["studies"]["thin"]["dirs"]["thin"])
    assert build_shards.main([*other, f"--shards.salt={SHARDS_SALT}"]) == 0
    refused("partition 1/3 was planned from other inputs")
    # A partition count that does not match the others.
    _build_partitions(synthetic_dicom["root"], out, 2, indexes=[0])
    refused("partitions of 2 and 3-way builds")


# ------------------------------------------------------------ the builder's fast paths equal what they replace (25)


def test_fast_hu_percentiles_npy_bytes_and_hu_conversion_equal_the_plain_numpy_ones():
    import io

    from ctld.data.dicom_pixels import _to_hu
    from ctld.data.dicom_scan import SeriesSkipped
    from ctld.data.domain import HU_PERCENTILES, hu_percentiles
    from ctld.data.shards import npy_bytes

    rng = np.random.default_rng(0)
    for trial in range(400):
        dtype = np.dtype(["<i2", "<u2", ">i2", ">u2", "u1", "i1"][trial % 6])
        info = np.iinfo(dtype)
        low = int(rng.integers(info.min, info.max))
        values = rng.integers(low, int(rng.integers(low, info.max)) + 1, size=(int(rng.integers(1, 4)), 5, 7))
        values = values.astype(dtype)
        # hu_percentiles: np.percentile's linear method, bit for bit, from one sort.
        assert hu_percentiles(values) == tuple(float(v) for v in np.percentile(values.reshape(-1), HU_PERCENTILES))
        # HU conversion: the 16-bit add equals the 32-bit reference, and refuses what does not fit int16.
        intercept = float(rng.choice([0, -1024, -32768, 1000, -40000, int(rng.integers(-70000, 70000))]))
        reference = values.astype(np.int64) + int(intercept)
        fits = reference.min() >= -32768 and reference.max() <= 32767
        if fits:
            converted = _to_hu(values, 1.0, intercept, "x")
            assert converted.dtype == np.int16 and (converted == reference).all()
        else:
            with pytest.raises(SeriesSkipped, match="do not fit int16"):
                _to_hu(values, 1.0, intercept, "x")
    for array in (np.zeros((3, 4, 5), np.int16), rng.integers(-1000, 3000, (7, 9, 11)).astype(np.int16),
                  np.asfortranarray(np.ones((3, 4, 5), np.float32)), np.arange(20, dtype=np.int16)[::2],
                  np.zeros((0, 4, 5), np.int16), np.ones((2, 3, 1, 4, 4), np.float16)):
        saved = io.BytesIO()
        np.save(saved, np.ascontiguousarray(array), allow_pickle=False)
        assert npy_bytes(array) == saved.getvalue()


def test_shard_sink_writes_the_bytes_of_webdatasets_tar_writer(tmp_path):
    """The sink swaps webdataset's stream-mode tar for a seekable-mode one (fewer copies): same bytes, same hash."""
    import hashlib
    import io

    from ctld.data.shard_plan import DONE_DIR, ShardPlan
    from ctld.data.shard_writer import _ShardSink
    from ctld.data.shards import encode_sample

    rng = np.random.default_rng(0)
    info = {"factor": 5, "offset": 0, "thick_source": "simulated", "shape_thin": [13, 17, 19],
            "shape_thick": [2, 17, 19], "thin_spacing_mm": [1.0, 1.0, 1.0]}
    samples = [encode_sample(f"{i:016x}_abc", rng.integers(-1000, 1000, (13, 17, 19)).astype(np.int16),
                             rng.integers(-1000, 1000, (2, 17, 19)).astype(np.int16), info) for i in range(3)]
    (tmp_path / DONE_DIR).mkdir()
    sink = _ShardSink(tmp_path, ShardPlan("train-000000.tar", "train", [None] * 3))
    for sample in samples:
        sink.add({"ok": True, "sample": sample})
    record = sink.close()
    reference = io.BytesIO()
    writer = wds.TarWriter(reference, mtime=0.0)
    for sample in samples:
        writer.write(sample)
    writer.close()
    assert (tmp_path / "train-000000.tar").read_bytes() == reference.getvalue()
    assert record["sha256"] == hashlib.sha256(reference.getvalue()).hexdigest()
    assert record["bytes"] == len(reference.getvalue()) and record["samples"] == 3


def test_an_empty_test_split_gets_one_patient_of_a_small_cohort():
    from ctld.data.shard_plan import Job, fill_empty_test_split, split_of

    def jobs_of(cases):  # two series per patient: both must move together
        return [Job(key=f"{case}_{series}", split=split_of(case, 0.0, 0.2), kind="nifti", series_id=series,
                    est_bytes=1, rel_path="x") for case in cases for series in ("s1", "s2")]

    # Hex ids whose hash positions all lie above 0.2: the hash alone leaves the test split empty.
    cases = [c for c in (f"{i:08x}" for i in range(200)) if split_of(c, 0.0, 0.2) == "train"][:4]
    jobs = fill_empty_test_split(jobs_of(cases), 0.2)
    held = {j.case_id for j in jobs if j.split == "test"}
    assert len(held) == 1 and sum(j.split == "test" for j in jobs) == 2  # one patient, both of its series
    assert fill_empty_test_split(jobs_of(cases), 0.2) == jobs  # deterministic
    assert {j.case_id for j in fill_empty_test_split(jobs_of(cases[::-1]), 0.2) if j.split == "test"} == held
    assert all(j.split == "train" for j in fill_empty_test_split(jobs_of(cases), 0.0))  # no test split asked for
    assert all(j.split == "train" for j in fill_empty_test_split(jobs_of(cases[:2]), 0.2))  # 2 patients: keep both


def test_training_urls_across_builds_give_the_export_their_combined_training_domain(tmp_path):
    """data.train_urls listing shards of several builds (one per hospital, or per patient as bench_real.py builds
    them): the export's domain spans their training splits, never another split's patients."""
    from ctld.config import DataConfig
    from ctld.data.domain import training_domain
    from ctld.data.shards import manifest_training_grid, training_manifest

    def build(name, thin_mm, pixel_mm, test_thin_mm):
        folder = tmp_path / name
        folder.mkdir()
        stats = lambda v: {"min": v, "median": v, "max": v}  # noqa: E731
        manifest = {"format_version": 1, "factor": 5, "thick_profile": "box", "samples": 2, "shards": [],
                    "settings": {"inplane_spacing_mm": 0.0},
                    "geometry": {"thin_spacing_z_mm": {"min": min(thin_mm, test_thin_mm), "median": thin_mm,
                                                       "max": max(thin_mm, test_thin_mm)}},
                    "splits": {"train": {"samples": 1, "patients": 1, "thin_spacing_z_mm": stats(thin_mm),
                                         "pixel_spacing_mm": stats(pixel_mm)},
                               "test": {"samples": 1, "patients": 1, "thin_spacing_z_mm": stats(test_thin_mm),
                                        "pixel_spacing_mm": stats(pixel_mm)}}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return str(folder / "train-000000.tar")

    urls = "::".join([build("a", 1.0, 0.5, 3.0), build("b", 1.6, 0.75, 0.5)])
    manifest = training_manifest(DataConfig(train_urls=urls))
    domain = training_domain(manifest, hu_window=(-1024, 2048))
    assert (domain["thin_spacing_mm"]["min"], domain["thin_spacing_mm"]["max"]) == (1.0, 1.6)  # the test splits' 3.0
    assert (domain["pixel_spacing_mm"]["min"], domain["pixel_spacing_mm"]["max"]) == (0.5, 0.75)  # and 0.5 not in
    assert manifest["splits"]["train"]["patients"] == 2
    assert manifest_training_grid(manifest) == {"thin_spacing_mm": pytest.approx(1.3)}
    assert training_manifest(DataConfig(train_urls="pipe:aws s3 cp s3://bucket/train-000000.tar -")) is None
    assert training_manifest(DataConfig(train_urls=str(tmp_path / "nowhere" / "train-000000.tar"))) is None
