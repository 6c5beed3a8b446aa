"""``cecore demo`` runs, exits 0, and reports agreeing objectives and torch checks."""

import re

from cecore import cli


def test_demo_runs_and_reports(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "breast_cancer"):
        assert f"== {name}:" in out
    objectives = [float(m) for m in re.findall(r"(?:Classifier|Regression)\s.*\s([\d.]+)\n", out)]
    assert len(objectives) == 4
    for ours, theirs in zip(objectives[::2], objectives[1::2]):
        assert abs(ours - theirs) <= 1e-6 * theirs
    # torch must be installed for the suite: its comparison has to have run
    torch_lines = [line for line in out.splitlines() if "torch cross_entropy" in line]
    diffs = [float(v) for line in torch_lines for v in re.findall(r"difference\| = ([\d.eE+-]+)", line)]
    assert len(diffs) == 4 and max(diffs) < 1e-10
