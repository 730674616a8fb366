"""Progress rows (mhd_hpc/run/progress.py): rows merged over ranks, interval averages, the line."""

from mhd_hpc.run.progress import Interval, merge_client_rows, train_line


def test_client_rows_are_means_over_ranks_and_bytes_are_summed():
    rows = [(0, {"loss_ce": 1.0, "bytes_sent": 10.0}), (0, {"loss_ce": 3.0, "bytes_sent": 5.0}),
            (1, {"loss_ce": 2.0, "bytes_sent": 7.0, "staleness": 4.0})]
    merged = merge_client_rows(rows, 2)
    assert merged[0] == {"loss_ce": 2.0, "bytes_sent": 15.0}
    assert merged[1] == {"loss_ce": 2.0, "bytes_sent": 7.0, "staleness": 4.0}


def test_interval_rows_average_and_reset():
    interval = Interval()
    interval.add({"loss_ce": 1.0})
    interval.add({"loss_ce": 3.0})
    row = interval.row(sent=100, received=50, waited=0.5, lr=0.1)
    assert row["loss_ce"] == 2.0 and row["exchange_wait_s"] == 0.25
    assert row["bytes_sent"] == 100 and row["lr"] == 0.1 and row["step_time_s"] >= 0
    assert interval.steps == 0 and interval.sums == {}
    line = train_line(20, 600, [dict(row, loss_total=2.0)])
    assert line.startswith("step     20/600 | ce 2.000 (unweighted) | weighted total 2.000 |")


class _Metrics:
    def __init__(self):
        self.eval = []

    def write_train(self, step, columns):
        pass

    def write_eval(self, step, summary):
        self.eval.append(summary)


def test_recorder_judges_one_model_methods_on_the_pooled_task():
    """The same evaluation fails client 1 when each client owns its model (its own labels) and
    passes when the clients train one model (supervised, FedAvg: judged on the union)."""
    import numpy as np

    from mhd_hpc.run.progress import Recorder

    dist = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    accs = [np.array([[0.95, 0.95, 0.3, 0.3]])] * 2  # (H=1, C) per client
    for one_model, health in ((False, [1, 0]), (True, [1, 1])):
        metrics, lines = _Metrics(), []
        rec = Recorder(metrics, lines.append, total_steps=10, heads=["main"], distribution=dist,
                       health_from=0, one_model=one_model)
        row = {"step_time_s": 0.1, "exchange_wait_s": 0.0, "bytes_sent": 0}
        rec.train_rows(5, [(0, {**row, "loss_ce": 0.1}), (1, {**row, "loss_ce": 1.0})])
        rec.evaluation(5, accs, [None, None], None)
        assert metrics.eval[-1]["health"].tolist() == health
        assert any("WARNING health" in line for line in lines) == (not one_model)


def test_progress_line_says_what_its_numbers_count():
    """Traffic per client and interval beside the run's total, the two batches' rates, the
    weighted total apart from the unweighted terms."""
    rows = [{"loss_ce": 0.5, "loss_aux1": 0.25, "loss_total": 0.9, "step_time_s": 0.02,
             "exchange_wait_s": 0.005, "bytes_sent": 2e5},
            {"loss_ce": 0.7, "loss_aux1": 0.35, "loss_total": 1.1, "step_time_s": 0.02,
             "exchange_wait_s": 0.005, "bytes_sent": 4e5}]
    line = train_line(100, 600, rows, (32, 64), eta_s=10, sent_total_bytes=12.3e6)
    assert "| aux1 0.300 ce 0.600 (unweighted) | weighted total 1.000 |" in line
    assert "20 ms/step, 1600 + 3200 samples/s per client (private + public)" in line
    assert "exchange wait 5 ms" in line
    assert "sent 0.30 MB/client this interval (12.3 MB total)" in line
    assert line.endswith("| ETA 10 s")


class _Rows(_Metrics):
    def __init__(self):
        super().__init__()
        self.train = []

    def write_train(self, step, columns):
        self.train.append(columns)


def _recorder(metrics, lines, **kw):
    import numpy as np

    from mhd_hpc.run.progress import Recorder

    return Recorder(metrics, lines.append, heads=["main"],
                    distribution=np.array([[1.0, 0.0], [0.0, 1.0]]), **kw)


def test_a_resumed_run_continues_its_wall_time_and_traffic_total():
    from mhd_hpc.run.progress import run_so_far
    import numpy as np

    before = run_so_far({"train": {"wall_s": np.array([[40.0, 41.0], [80.0, 82.0]]),
                                   "bytes_sent": np.array([[1e6, 2e6], [3e6, 4e6]])}})
    assert before == (82.0, 10e6)
    assert run_so_far({"train": {}}) == (0.0, 0.0)
    metrics, lines = _Rows(), []
    rec = _recorder(metrics, lines, total_steps=40, health_from=None, start_step=20,
                    before=before)
    row = {"step_time_s": 0.1, "exchange_wait_s": 0.0, "bytes_sent": 1e6, "wall_s": 3.0}
    rec.train_rows(30, [(0, row), (1, dict(row, wall_s=5.0))])
    assert metrics.train[-1]["wall_s"] == [85.0, 87.0]
    assert "sent 1.00 MB/client this interval (12.0 MB total)" in lines[-1]


def test_log_stamps_continue_from_the_previous_wall_time(capsys):
    from mhd_hpc.run.progress import Log

    log = Log(is_root=True)
    log.continue_from(3600.0)
    log("resumed")
    assert capsys.readouterr().out.startswith("[ 3600.")


def test_a_run_never_judged_ends_with_a_note_not_a_pass():
    for health_from, noted in ((100, True), (40, False), (None, False)):
        rec = _recorder(_Rows(), [], total_steps=60, health_from=health_from)
        assert any("judged no evaluation" in line for line in rec.closing_lines()) == noted


def test_tensorboard_writes_one_run_per_client_with_the_same_tags(tmp_path):
    """Clients overlay in one chart: the same tag in LOG_DIR/client<i> (and the mean's run)."""
    import numpy as np
    import pytest

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mhd_hpc.run.progress import TensorBoard

    clients = ["client0", "client1"]
    tb = TensorBoard(tmp_path, 0, clients)
    tb.scalars("train/loss_ce", 5, np.array([1.0, 3.0]), clients)
    tb.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client0", "client1", "mean"]
    for name, value in (("client0", 1.0), ("client1", 3.0), ("mean", 2.0)):
        assert list((tmp_path / name).glob("events.out.tfevents.*")), name
        events = EventAccumulator(str(tmp_path / name))
        events.Reload()
        assert events.Tags()["scalars"] == ["train/loss_ce"]
        assert [(e.step, e.value) for e in events.Scalars("train/loss_ce")] == [(5, value)]
