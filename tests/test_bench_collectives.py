"""Smoke test of bench/bench_collectives.py at a tiny size: CSV columns, byte accounting, PNG."""

import csv
import os

import pytest

from bench import bench_collectives as bc


@pytest.mark.distributed
def test_bench_collectives_tiny(tmp_path, capsys):
    assert bc.main(["--worlds", "2", "--samples", "16", "--steps", "1", "--warmup", "0", "--dim", "8",
                    "--out", str(tmp_path)]) == 0
    with open(tmp_path / "collectives.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bc.COLUMNS
    assert [r["mode"] for r in rows] == bc.available_modes()
    by_mode = {r["mode"]: r for r in rows}
    for r in rows:
        assert r["world_size"] == "2" and r["samples_per_rank"] == "16" and r["global_batch"] == "32"
        assert float(r["time_median_ms"]) > 0
        assert r["device"] and r["torch_version"] and r["date"]
        # the closed form and the bytes the collectives recorded agree
        assert int(r["bytes_sent_formula"]) == int(r["bytes_sent_counted"])
    # grouped with n = 1 sends only the metadata; global sends the text features
    assert int(by_mode["grouped"]["bytes_sent_formula"]) < int(by_mode["global"]["bytes_sent_formula"])
    assert by_mode["grouped"]["candidates_per_positive"] == "16"
    assert by_mode["global"]["candidates_per_positive"] == "32"
    assert os.path.getsize(tmp_path / "collectives.png") > 1000
    assert "| 2 | global |" in capsys.readouterr().out


def test_bench_collectives_bad_args(tmp_path):
    with pytest.raises(SystemExit):
        bc.main(["--modes", "nonsense", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="does not divide"):
        bc.main(["--worlds", "4", "--group-size", "3", "--out", str(tmp_path)])
