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
    assert line.startswith("step     20/600 | ce 2.000 total 2.000 |")


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
