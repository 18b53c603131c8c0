"""archpass.io: every output path is checked (one OutputError line, never a traceback) and
written atomically; the null device validates without writing."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import archpass.io as aio
from archpass.errors import OutputError
from archpass.io import append_line, atomic_write_text, check_output, check_output_dir, write_atomically


def test_regular_file_and_new_path_are_accepted(tmp_path):
    (tmp_path / "old.onnx").write_text("x")
    assert check_output(tmp_path / "old.onnx") == tmp_path / "old.onnx"
    assert check_output(tmp_path / "new" / "deeper" / "m.onnx") == tmp_path / "new" / "deeper" / "m.onnx"
    assert atomic_write_text(tmp_path / "new" / "a.json", "{}") == tmp_path / "new" / "a.json"
    assert (tmp_path / "new" / "a.json").read_text() == "{}"


def test_directory_is_refused(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        atomic_write_text(tmp_path, "{}")
    assert tmp_path.is_dir()


def test_fifo_is_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a FIFO, not a regular file.*validate without writing"):
        atomic_write_text(fifo, "{}")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # not replaced by a regular file


def test_the_null_device_validates_without_writing(tmp_path, monkeypatch):
    # a harmless stand-in for /dev/null: a FIFO that must survive as a FIFO
    null = tmp_path / "null"
    os.mkfifo(null)
    monkeypatch.setattr(aio, "NULL_DEVICE", str(null))
    seen = []
    assert write_atomically(null, lambda tmp: seen.append(tmp.write_text("data"))) is None
    assert seen == [4]  # the writer ran (the output was produced and validated) ...
    assert stat.S_ISFIFO(os.stat(null).st_mode)  # ... and nothing was written there
    assert check_output(null) is None


def test_real_null_device_is_recognized_without_writing():
    assert aio.is_null(os.devnull) and check_output(os.devnull) is None


def test_a_character_device_is_refused():
    # /dev/zero, not /dev/null: the null device means "validate"; only checked, never written
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    with pytest.raises(OutputError, match="character device"):
        check_output("/dev/zero")


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="Not a directory|not a folder"):
        check_output(tmp_path / "f" / "m.onnx")


def test_unwritable_folder(tmp_path, monkeypatch):
    # as root every folder is writable, so simulate the permission check's answer
    real = os.access
    monkeypatch.setattr(aio.os, "access", lambda p, mode: False if os.fspath(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(OutputError, match="no permission to create files in"):
        check_output(tmp_path / "m.onnx")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="no permission"):
            atomic_write_text(ro / "a.json", "{}")
    finally:
        ro.chmod(0o700)


def test_read_only_filesystem(tmp_path, monkeypatch):
    real = os.statvfs

    class RO:
        def __init__(self, st):
            self.f_flag = st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(aio.os, "statvfs", lambda p: RO(real(p)))
    with pytest.raises(OutputError, match="read-only filesystem"):
        check_output(tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="read-only filesystem"):
        check_output_dir(tmp_path / "target")


def test_os_errors_while_writing_become_one_line(tmp_path):
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="no space left"):
        write_atomically(tmp_path / "m.onnx", full)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_a_folder_that_refuses_new_files():
    with pytest.raises(OutputError, match="cannot write /proc/archpass-test.onnx"):
        atomic_write_text("/proc/archpass-test.onnx", "{}")


def test_output_dir_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(tmp_path / "f")
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"


def test_append_line(tmp_path):
    p = tmp_path / "d" / "cache.jsonl"
    append_line(p, "a")
    append_line(p, "b\n")
    assert p.read_text() == "a\nb\n"
    with pytest.raises(OutputError, match="is a directory"):
        append_line(tmp_path, "c")
