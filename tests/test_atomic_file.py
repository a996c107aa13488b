"""Files written whole or not at all (`streamgen.atomic_file.write_atomic`)."""

import threading

import pytest

from streamgen.atomic_file import write_atomic


def test_a_failed_write_leaves_the_file_as_it_was_and_nothing_beside_it(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"before")

    def fails_half_way(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, fails_half_way)
    assert target.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_two_writers_of_one_path_at_once_leave_one_whole_file(tmp_path):
    """Both wrote under one temporary name: their bytes interleaved, and the second rename found nothing."""
    target, both_started, errors = tmp_path / "bundle.json", threading.Barrier(2), []

    def writer(byte: bytes):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(byte * 5)
                f.flush()
                both_started.wait(5)
                f.write(byte * 5)

        try:
            write_atomic(target, write)
        except Exception as e:  # noqa: BLE001 (the test names it)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b,)) for b in (b"A", b"B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and target.read_bytes() in (b"A" * 10, b"B" * 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.json"]
