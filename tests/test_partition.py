"""The dataset split (mhd_hpc/data/build/partition.py, paper §3.3): statistics, determinism, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mhd_hpc.data.build.partition import Partition, assign_primary_labels, make_partition


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
    part = make_partition(np.array([0, 1, 2]), 10, 0.0, "random", 1, 0.0, seed=0)
    with pytest.raises(ValueError, match="client"):
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
