"""The dataset split (mhd_hpc/data/build/partition.py, paper §3.3): statistics, determinism, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mhd_hpc.data.build.partition import (Partition, PartitionError, assign_primary_labels,
                                          make_partition)


def _labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def test_paper_sanity_histogram_random_250_of_1000():
    # Paper: ~100 / 270 / 310 / 210 / 110 labels with 0 / 1 / 2 / 3 / 4+ primary clients.
    # Per label the number of primary clients is Binomial(8, 1/4) (clients draw independently).
    k, c, lpc, seeds = 8, 1000, 250, (0, 1, 2, 3)
    p = lpc / c
    pmf = [math.comb(k, n) * p**n * (1 - p) ** (k - n) for n in range(k + 1)]
    expected = np.array(pmf[:4] + [sum(pmf[4:])]) * c  # 100.1, 267.0, 311.5, 207.6, 113.8
    sd_mean = np.sqrt(c * (expected / c) * (1 - expected / c)) / np.sqrt(len(seeds))

    hists = []
    for seed in seeds:
        part = make_partition(np.arange(c), k, 0.0, "random", lpc, 100.0, seed)
        assert all(prim.size == lpc and np.unique(prim).size == lpc for prim in part.primary)
        h = part.primary_client_histogram()
        assert h.shape == (k + 1,) and h.sum() == c
        hists.append(np.concatenate([h[:4], [h[4:].sum()]]))
    mean = np.mean(hists, axis=0)
    assert np.all(np.abs(mean - expected) < 4 * sd_mean), (mean, expected)
    assert np.all(np.abs(mean - np.array([100, 270, 310, 210, 110])) < 25), mean


def test_even_assignment_gives_exactly_m_primary_clients():
    part = make_partition(np.arange(1000), 8, 0.0, "even", 250, 1.0, seed=3)
    hist = part.primary_client_histogram()
    assert hist[2] == 1000 and hist.sum() == 1000  # m = 8 * 250 / 1000 = 2
    for prim in part.primary:
        assert prim.size == 250 and np.unique(prim).size == 250
        assert np.all(np.diff(prim) > 0) and prim.dtype == np.int64


def test_even_assignment_requires_divisibility():
    with pytest.raises(ValueError, match="multiple"):
        assign_primary_labels(10, 3, 3, "even", np.random.default_rng(0))


def test_no_repetition_disjoint_and_coverage():
    labels = np.random.default_rng(5).integers(0, 20, size=2003)
    part = make_partition(labels, 5, 0.1, "random", 4, 10.0, seed=7)
    assert part.public.size == round(0.1 * 2003)
    everything = np.concatenate([part.public, *part.clients])
    assert everything.size == labels.size  # nothing dealt twice
    assert np.array_equal(np.sort(everything), np.arange(labels.size))  # nothing lost
    for idx in [part.public, *part.clients]:
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


def test_counts_match_indices():
    labels = np.random.default_rng(1).integers(0, 7, size=700)
    part = make_partition(labels, 3, 0.2, "random", 2, 5.0, seed=11, num_classes=9)
    assert part.counts.shape == (3, 9) and part.counts.dtype == np.int64
    for i, idx in enumerate(part.clients):
        assert np.array_equal(part.counts[i], np.bincount(labels[idx], minlength=9))
    assert part.counts.sum() == labels.size - part.public.size
    dist = part.label_distribution()
    assert np.allclose(dist.sum(axis=1), 1.0)
    assert np.allclose(dist[0], part.counts[0] / part.counts[0].sum())


def test_deterministic_from_seed():
    labels = _labels(10, 50)
    a = make_partition(labels, 4, 0.1, "random", 3, 20.0, seed=42)
    b = make_partition(labels, 4, 0.1, "random", 3, 20.0, seed=42)
    c = make_partition(labels, 4, 0.1, "random", 3, 20.0, seed=43)
    assert np.array_equal(a.public, b.public) and np.array_equal(a.counts, b.counts)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))
    assert all(np.array_equal(x, y) for x, y in zip(a.primary, b.primary))
    assert not (np.array_equal(a.public, c.public) and np.array_equal(a.counts, c.counts))


@pytest.mark.parametrize("skew, expected", [(0.0, 1 / 4), (100.0, 101 / 104)])
def test_skew_concentrates_on_primary_clients(skew, expected):
    # even mode, 4 clients x 2 labels over 8 classes: every label has exactly one primary client,
    # so a sample lands on it with probability (1+s) / ((1+s) + 3).
    per_class = 600
    part = make_partition(_labels(8, per_class), 4, 0.0, "even", 2, skew, seed=0)
    on_primary = sum(part.counts[i, prim].sum() for i, prim in enumerate(part.primary))
    frac = on_primary / (8 * per_class)
    sd = math.sqrt(expected * (1 - expected) / (8 * per_class))
    assert abs(frac - expected) < 5 * sd, frac
    if skew == 0.0:  # iid: every client gets about a quarter of every class
        assert np.all(np.abs(part.counts - per_class / 4) < 5 * math.sqrt(per_class * 3 / 16))


def test_skew_random_mode_matches_expected_primary_mass():
    k, c, per_class, s = 5, 12, 300, 30.0
    part = make_partition(_labels(c, per_class), k, 0.0, "random", 4, s, seed=9)
    n_prim = np.zeros(c)
    for prim in part.primary:
        n_prim[prim] += 1
    # P(sample of label l lands on *a* primary client) = n_l (1+s) / (n_l (1+s) + K - n_l).
    p_l = n_prim * (1 + s) / (n_prim * (1 + s) + k - n_prim)
    expected = per_class * p_l.sum()
    observed = sum(part.counts[i, prim].sum() for i, prim in enumerate(part.primary))
    sd = math.sqrt(per_class * (p_l * (1 - p_l)).sum())
    assert abs(observed - expected) < 5 * sd + 1


def test_zero_labels_per_client_is_iid():
    part = make_partition(_labels(6, 100), 3, 0.0, "random", 0, 100.0, seed=2)
    assert all(p.size == 0 for p in part.primary)
    assert part.primary_client_histogram().tolist() == [6, 0, 0, 0]
    assert np.all(np.abs(part.counts - 100 / 3) < 25)


def test_label_distribution_names_empty_client():
    # make_partition refuses an empty client (data.min_samples >= 1); a Partition read back
    # from elsewhere may still have one.
    with pytest.raises(PartitionError, match="client 0 only 0 private samples"):
        make_partition(np.array([0, 1, 2]), 10, 0.0, "random", 1, 0.0, seed=0)
    empty = np.zeros(0, dtype=np.int64)
    part = Partition(3, empty, [np.array([0]), empty], [empty, empty],
                     np.array([[1, 0, 0], [0, 0, 0]]), {})
    with pytest.raises(ValueError, match="client 1"):
        part.label_distribution()


def test_manifest_is_json_and_consistent():
    part = make_partition(_labels(5, 40), 2, 0.25, "random", 2, 3.0, seed=4)
    man = json.loads(json.dumps(part.manifest()))
    assert man["num_classes"] == 5 and man["num_clients"] == 2 == part.num_clients
    assert man["public_count"] == 50
    assert man["client_counts"] == [int(c.size) for c in part.clients]
    assert man["counts"] == part.counts.tolist()
    assert man["primary"] == [p.tolist() for p in part.primary]
    assert man["settings"] == {"public_fraction": 0.25, "label_assignment": "random",
                               "labels_per_client": 2, "skew": 3.0, "seed": 4}
    assert isinstance(part, Partition)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels_per_client=11), "labels_per_client"),
    (dict(labels_per_client=-1), "labels_per_client"),
    (dict(label_assignment="zipf"), "label_assignment"),
    (dict(public_fraction=1.0), "public_fraction"),
    (dict(public_fraction=-0.1), "public_fraction"),
    (dict(skew=-1.0), "skew"),
])
def test_validation_errors(kwargs, match):
    args = dict(labels=_labels(10, 3), num_clients=2, public_fraction=0.1,
                label_assignment="random", labels_per_client=2, skew=1.0, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_partition(**args)


@pytest.mark.parametrize("classes, clients, size", [(1000, 8, 250), (10, 4, 5), (10, 10, 3),
                                                    (8, 8, 4)])
def test_even_assignment_gives_distinct_tasks(classes, clients, size):
    """Tiling one permutation gave pairs of clients identical primary sets whenever the set size
    divides the classes (1000 labels, 8 x 250: four identical pairs): every set must differ,
    hold distinct labels, and every label must be primary exactly m times."""
    for seed in range(5):
        sets = assign_primary_labels(classes, clients, size, "even", np.random.default_rng(seed))
        assert len({tuple(s) for s in sets}) == clients
        assert all(len(set(s.tolist())) == size for s in sets)
        counts = np.bincount(np.concatenate(sets), minlength=classes)
        assert set(counts.tolist()) == {clients * size // classes}


def test_even_assignment_says_when_distinct_sets_do_not_exist():
    with pytest.raises(ValueError, match="distinct sets"):  # only {0} and {1} exist
        assign_primary_labels(2, 4, 1, "even", np.random.default_rng(0))


# -- data.partition=dirichlet and plug-in partitions -----------------------------------------

def _dirichlet(alpha: float, seed: int = 0, min_samples: int = 1, clients: int = 8):
    return make_partition(_labels(10, 600), clients, 0.1, "random", 3, 100.0, seed,
                          scheme="dirichlet", alpha=alpha, min_samples=min_samples)


def test_dirichlet_is_seeded_disjoint_and_complete():
    a, b, c = _dirichlet(0.5, seed=1), _dirichlet(0.5, seed=1), _dirichlet(0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))
    assert not all(np.array_equal(x, y) for x, y in zip(a.clients, c.clients))
    every = np.concatenate([a.public, *a.clients])
    assert np.unique(every).size == every.size == 6000  # disjoint, nothing lost
    assert a.public.size == 600
    assert a.counts.sum() == 5400 and a.settings["partition"] == "dirichlet"
    assert a.settings["alpha"] == 0.5 and json.loads(json.dumps(a.manifest()))


def test_dirichlet_smaller_alpha_concentrates_each_client_on_fewer_labels():
    # Mean over clients of the largest label share: ~1/10 when iid, towards 1 as alpha -> 0.
    top = {alpha: np.mean([_dirichlet(alpha, seed).label_distribution().max(axis=1).mean()
                           for seed in range(3)]) for alpha in (0.1, 0.5, 100.0)}
    assert top[0.1] > top[0.5] > top[100.0]
    assert top[100.0] < 0.2 and top[0.1] > 0.4, top


def test_dirichlet_refuses_a_client_below_min_samples_naming_the_key():
    with pytest.raises(PartitionError, match="data.min_samples=500") as info:
        _dirichlet(0.05, min_samples=500)
    assert info.value.key == "data.min_samples"
    assert min(c.size for c in _dirichlet(0.05, min_samples=10).clients) >= 10
    with pytest.raises(PartitionError) as info:
        _dirichlet(0.0)
    assert info.value.key == "data.alpha"


def test_the_primary_partition_is_unchanged_by_the_new_keys():
    labels = _labels(10, 50)
    old = make_partition(labels, 4, 0.1, "random", 3, 100.0, 5)
    same = make_partition(labels, 4, 0.1, "random", 3, 100.0, 5, scheme="primary", alpha=9.0)
    assert all(np.array_equal(x, y) for x, y in zip(old.clients, same.clients))
    assert "partition" not in old.settings and "min_samples" not in old.settings


PLUGIN = '''
import numpy as np

def by_parity(labels, num_clients, num_classes, seed):
    idx = np.arange(labels.size)
    return [idx[labels % num_clients == i] for i in range(num_clients)]

def overlapping(labels, num_clients, num_classes, seed):
    return [np.arange(labels.size)] * num_clients

def too_few(labels, num_clients, num_classes, seed):
    return [np.arange(3)]

def out_of_range(labels, num_clients, num_classes, seed):
    return [np.array([labels.size])] + [np.array([i]) for i in range(num_clients - 1)]

def floats(labels, num_clients, num_classes, seed):
    return [np.array([0.5])] * num_clients
'''


def test_a_plugin_partition_is_used_and_its_result_checked(tmp_path, monkeypatch):
    (tmp_path / "my_split.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    labels = _labels(10, 20)
    part = make_partition(labels, 2, 0.1, "random", 3, 100.0, 0, scheme="my_split:by_parity")
    assert part.counts[0][1::2].sum() == 0 and part.counts[1][0::2].sum() == 0
    assert part.counts.sum() == 180 and part.settings["partition"] == "my_split:by_parity"
    assert len(part.settings["partition_sha256"]) == 16
    for name, words in [("overlapping", "disjoint"), ("too_few", "got 1 items"),
                        ("out_of_range", "outside"), ("floats", "dtype float64"),
                        ("missing", "no attribute")]:
        with pytest.raises(PartitionError, match=words) as info:
            make_partition(labels, 2, 0.1, "random", 3, 100.0, 0, scheme=f"my_split:{name}")
        assert info.value.key == "data.partition"
    with pytest.raises(PartitionError, match="data.min_samples=100"):
        make_partition(labels, 2, 0.1, "random", 3, 100.0, 0, scheme="my_split:by_parity",
                       min_samples=100)
