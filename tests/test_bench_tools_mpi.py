"""tools/bench_exchange.py runs under real mpirun at tiny sizes and writes its table."""

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
