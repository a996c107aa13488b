"""Long work shows progress in a log too (stderr not a terminal), not only on a terminal."""

from streamgen.progress import Progress


def test_plain_lines_in_a_log(capsys):
    with Progress("vocoder", 4, enabled=True, every_s=0.0, mel=float("nan")) as bar:
        for step in range(1, 5):
            bar.update(step, mel=1.0 / step)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("vocoder 1/4 (25.0 %)") and "left" in lines[0] and lines[0].endswith("mel 1")
    assert lines[-1].startswith("vocoder 4/4 (100.0 %)") and "left" not in lines[-1] and lines[-1].endswith("mel 0.25")


def test_silent_when_disabled(capsys):
    with Progress("units", 3, enabled=False) as bar:
        bar.update(advance=3)
    assert capsys.readouterr().err == ""
