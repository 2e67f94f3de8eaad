"""ctld/data/archive.py: malformed ZIP members are skipped with a reason; the rest of the archive is used."""

from __future__ import annotations

import zipfile

import pytest

from ctld.data.archive import UnsafeArchiveError, discover, safe_extract_zip


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path


def test_dot_member_is_skipped_and_the_rest_extracted(tmp_path):
    source = _zip(tmp_path / "dot.zip", [("./", b""), ("good/a.dcm", b"A"), (".", b"x")])
    skipped = []
    written = safe_extract_zip(source, tmp_path / "out", skipped=skipped)
    assert [p.read_bytes() for p in written] == [b"A"]
    assert {name for name, _ in skipped} == {"./", "."}
    assert all("no file name" in reason for _, reason in skipped)


@pytest.mark.parametrize("file_first", [True, False])
def test_file_beside_a_folder_of_the_same_name_is_skipped(tmp_path, file_first):
    members = [("a", b"file"), ("a/b.dcm", b"B"), ("c.dcm", b"C")]
    source = _zip(tmp_path / "clash.zip", members if file_first else members[::-1])
    skipped = []
    written = safe_extract_zip(source, tmp_path / "out", skipped=skipped)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["a/b.dcm", "c.dcm"]
    assert [name for name, _ in skipped] == ["a"] and "folder" in skipped[0][1]


def test_discover_records_skipped_members_and_keeps_the_others(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _zip(src / "x.zip", [("./", b""), ("a", b"file"), ("a/b.dcm", b"B")])
    skipped = []
    with discover([src], skipped=skipped) as files:
        assert [rel for _, rel in files] == ["x.zip!a/b.dcm"]
    assert sorted(rel for rel, _, _ in skipped) == ["x.zip!./", "x.zip!a"]
    assert {reason for _, reason, _ in skipped} == {"bad_archive_member"}


def test_unsafe_archives_are_still_refused_whole(tmp_path):
    with pytest.raises(UnsafeArchiveError, match="outside the extraction folder"):
        safe_extract_zip(_zip(tmp_path / "t.zip", [("ok.dcm", b"1"), ("../x", b"2")]), tmp_path / "out")


def test_member_name_the_file_system_refuses_is_skipped(tmp_path):
    source = _zip(tmp_path / "long.zip", [("x" * 300 + ".dcm", b"1"), ("ok.dcm", b"2")])
    skipped = []
    written = safe_extract_zip(source, tmp_path / "out", skipped=skipped)
    assert [p.name for p in written] == ["ok.dcm"]
    assert len(skipped) == 1 and "cannot be a file here" in skipped[0][1]


def test_symlinks_are_followed_once_and_broken_or_looping_ones_named(tmp_path, caplog):
    """Issue 24: a study folder linked into the input is read; a link back up (a loop), a dangling link and a cycle
    of links are warned about by name and reason, and nothing is read twice or hangs."""
    import logging

    elsewhere = tmp_path / "elsewhere" / "study"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.dcm").write_bytes(b"x")
    source = tmp_path / "input"
    (source / "own").mkdir(parents=True)
    (source / "own" / "b.dcm").write_bytes(b"y")
    (source / "linked").symlink_to(elsewhere, target_is_directory=True)
    (source / "own" / "up").symlink_to("..", target_is_directory=True)
    (source / "dangling.dcm").symlink_to(tmp_path / "missing.dcm")
    (source / "c1.dcm").symlink_to(source / "c2.dcm")
    (source / "c2.dcm").symlink_to(source / "c1.dcm")
    with caplog.at_level(logging.WARNING), discover(source) as files:
        assert sorted(rel for _, rel in files) == ["linked/a.dcm", "own/b.dcm"]
    text = caplog.text
    assert "own/up (symlink_loop)" in text and "dangling.dcm (broken_symlink)" in text
    assert "c1.dcm (broken_symlink)" in text and "c2.dcm (broken_symlink)" in text
