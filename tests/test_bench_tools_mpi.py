"""tools/bench_exchange.py and tools/bench_hosted.py run under real mpirun at tiny sizes and
write their tables."""

import json

from conftest import ROOT, run_mpi


def test_bench_exchange_under_mpirun(tmp_path):
    out = tmp_path / "exchange.json"
    res = run_mpi(2, [str(ROOT / "tools" / "bench_exchange.py"), "--batch", "16",
                      "--classes", "20", "--heads", "2", "--emb", "8", "--steps", "3",
                      "--json", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert "top 1" in res.stdout and rows


def test_bench_hosted_compares_layouts(tmp_path, data_root):
    import subprocess
    import sys

    from conftest import mpi_env

    out = tmp_path / "hosted.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_hosted.py"), "--job",
                          str(ROOT / "jobs" / "digits.yaml"), "--clients", "4", "--layouts",
                          "4x1", "2x2", "--steps", "20", "--log-every", "5", "--repeats", "1",
                          "--data-root", str(data_root), "--json", str(out)],
                         capture_output=True, text=True, timeout=240, env=mpi_env())
    assert res.returncode == 0, res.stdout + res.stderr
    runs = json.loads(out.read_text())
    assert sorted(runs) == ["2x2", "4x1"]
    for layout in runs.values():
        assert layout[0]["client_steps_per_s"] > 0 and layout[0]["peak_rss_mb"] > 100
    assert "| 2x2 |" in res.stdout
