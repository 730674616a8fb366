"""The prediction exchange under real mpirun: delivery, sample-key check, timeouts."""

import pytest

from conftest import ROOT, run_mpi

SCRIPT = str(ROOT / "tests" / "mpi" / "exchange_check.py")


@pytest.mark.parametrize("ranks", [2, 3])
def test_exchange_delivers_what_peers_sent(ranks):
    res = run_mpi(ranks, [SCRIPT, "roundtrip"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("roundtrip ok") == ranks


def test_key_hash_mismatch_aborts_job_naming_the_peer():
    res = run_mpi(3, [SCRIPT, "mismatch"], timeout=120)
    assert res.returncode != 0
    # Client 2 distills from client 1 on a cycle: client 2 must detect client 1's batch differs.
    assert "FATAL on rank 2 (client 2)" in res.stderr
    assert "covers different samples" in res.stderr and "client 1" in res.stderr


def test_missing_message_times_out_naming_the_peer():
    res = run_mpi(3, [SCRIPT, "silent"], timeout=120)
    assert res.returncode != 0
    assert "timed out after 3 s" in res.stderr
    assert "receive from client 1 (rank 1)" in res.stderr


@pytest.mark.parametrize("mode", ["relay", "mean"])
def test_clients_of_different_rank_counts(mode):
    """Rows relayed through the leaders arrive as the sender computed them for each rank's own
    slice; averages over clients weigh clients, not ranks."""
    res = run_mpi(4, [SCRIPT, mode], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(f"{mode} ok") == 4
