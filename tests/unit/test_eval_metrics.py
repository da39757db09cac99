"""``difftrain.eval.metrics``: FID, KID, precision/recall and streaming stats against closed forms,
independent brute-force implementations and hand-checked cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from difftrain.eval.metrics import FeatureStats, fid, fid_from_features, gaussian_stats, kid, precision_recall


def rand_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def two_gaussians(d=8, seed=0):
    """Two full-covariance Gaussians with eigenvalues in [0.5, 2] and unrelated eigenbases."""
    rng = np.random.default_rng(seed)
    q1, q2 = rand_orthogonal(rng, d), rand_orthogonal(rng, d)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu1, mu2 = rng.normal(0, 0.3, d), rng.normal(0, 0.3, d)
    return mu1, (q1 * a) @ q1.T, mu2, (q2 * b) @ q2.T


# ------------------------------------------------------------------------------------------------ FID

def test_gaussian_stats_matches_numpy():
    x = np.random.default_rng(0).normal(2.0, 1.5, (300, 12))
    mu, sigma = gaussian_stats(torch.from_numpy(x).float())          # tensors and float32 are accepted
    x32 = x.astype(np.float32).astype(np.float64)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (12,) and sigma.shape == (12, 12)
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False, ddof=1), rtol=1e-10)


def test_fid_self_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(1.0, 2.0, (400, 16))
    assert fid_from_features(a, a) < 1e-6
    assert fid_from_features(a, b) > 1.0
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)
    mu1, s1, mu2, s2 = two_gaussians(16, seed=2)
    assert fid(mu1, s1, mu2, s2) == pytest.approx(fid(mu2, s2, mu1, s1), rel=1e-9)
    assert fid(mu1, s1, mu1, s1) < 1e-10


def test_fid_closed_form_commuting_covariances():
    """Diagonal, and full but sharing one eigenbasis: Tr sqrt(S1 S2) = sum sqrt(a_i b_i), so
    FID = ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(3)
    d = 10
    a, b = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q = rand_orthogonal(rng, d)
    assert fid(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T) == pytest.approx(expected, rel=1e-9)
    assert fid(mu1, np.diag(a), mu1, np.diag(a)) < 1e-12


def test_fid_general_covariances_match_scipy_sqrtm():
    mu1, s1, mu2, s2 = two_gaussians(12, seed=4)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-8                       # well conditioned: sqrtm is reliable
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean))
    assert expected > 0.5
    assert fid(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_singular_covariances_stable():
    """N < D: rank-deficient covariances (where sqrtm-based code produces complex parts). Checked against
    Tr sqrt(S1 S2) = nuclear norm of S1^{1/2} S2^{1/2} (its singular values are the square roots of the
    eigenvalues of S1^{1/2} S2 S1^{1/2}), computed with an SVD."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 32)), rng.normal(0.2, 1.0, (20, 32))
    assert fid_from_features(a, a) < 1e-6
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)

    def psd_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    nuclear = np.linalg.svd(psd_sqrt(s1) @ psd_sqrt(s2), compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    value = fid_from_features(a, b)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(expected, rel=1e-8)


def test_fid_from_samples_approaches_closed_form():
    """N = 20000 samples per Gaussian, D = 8, true FID ~ 1.4. The estimate's error comes from the sample
    means (sd ~ 2 sqrt(dmu^T (S1 + S2) dmu / N) ~ 0.015, plus a bias (Tr S1 + Tr S2) / N ~ 0.001) and the
    sample covariances; over 20 seeds it measured mean +0.006, sd 0.023. The tolerance 0.1 is ~4 sd (7% of
    the value), while N = 100 misses by much more, so the check has teeth."""
    mu1, s1, mu2, s2 = two_gaussians(8, seed=0)
    exact = fid(mu1, s1, mu2, s2)
    l1, l2 = np.linalg.cholesky(s1), np.linalg.cholesky(s2)
    rng = np.random.default_rng(100)
    n = 20000
    x = rng.standard_normal((n, 8)) @ l1.T + mu1
    y = rng.standard_normal((n, 8)) @ l2.T + mu2
    assert fid_from_features(x, y) == pytest.approx(exact, abs=0.1)
    assert abs(fid_from_features(x[:100], y[:100]) - exact) > 0.1


# ------------------------------------------------------------------------------------------------ KID

def cubic(a, b):
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_brute(x, y, unbiased=True):
    """Independent reference with explicit loops over i != j (unbiased) or all pairs (biased V-statistic)."""
    m = len(x)
    kxx = sum(cubic(x[i:i + 1], x[j:j + 1])[0, 0] for i in range(m) for j in range(m) if i != j or not unbiased)
    kyy = sum(cubic(y[i:i + 1], y[j:j + 1])[0, 0] for i in range(m) for j in range(m) if i != j or not unbiased)
    kxy = cubic(x, y).sum()
    norm = m * (m - 1) if unbiased else m * m
    return kxx / norm + kyy / norm - 2 * kxy / (m * m)


def test_kid_matches_brute_force_and_documented_subsets():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, (15, 5))
    # one subset as large as the smaller set: x in full (a permutation), 12 of y's 15 rows
    mean, std = kid(x, y, subsets=1, subset_size=100, seed=3)
    r = np.random.default_rng(3)
    ix, iy = r.choice(12, 12, replace=False), r.choice(15, 12, replace=False)
    assert mean == pytest.approx(mmd2_brute(x[ix], y[iy]), rel=1e-10) and std == 0.0
    # several subsets, drawn as documented: per subset real rows then fake rows from default_rng(seed)
    mean, std = kid(torch.from_numpy(x).float(), y, subsets=7, subset_size=6, seed=11)
    x32 = torch.from_numpy(x).float().double().numpy()
    r = np.random.default_rng(11)
    vals = []
    for _ in range(7):
        ix, iy = r.choice(12, 6, replace=False), r.choice(15, 6, replace=False)
        vals.append(mmd2_brute(x32[ix], y[iy]))
    assert mean == pytest.approx(np.mean(vals), rel=1e-10)
    assert std == pytest.approx(np.std(vals), rel=1e-8)
    assert kid(x, y, subsets=7, subset_size=6, seed=11) != kid(x, y, subsets=7, subset_size=6, seed=12)


def test_kid_unbiased_same_distribution():
    """300 independent pairs of 50 samples from the same N(0, I_8): the unbiased MMD^2 averages to 0 within
    4 standard errors, while the V-statistic (diagonal terms included) is biased by about
    2 (E k(x,x) - E k(x,x')) / m > 0 and sits many standard errors above 0."""
    d, m, trials = 8, 50, 300
    unbiased, biased = [], []
    for s in range(trials):
        rng = np.random.default_rng(1000 + s)
        x, y = rng.standard_normal((m, d)), rng.standard_normal((m, d))
        unbiased.append(kid(x, y, subsets=1, subset_size=m)[0])
        kxx, kyy, kxy = cubic(x, x), cubic(y, y), cubic(x, y)
        biased.append((kxx.sum() + kyy.sum() - 2 * kxy.sum()) / m ** 2)
    unbiased, biased = np.array(unbiased), np.array(biased)
    se_u, se_b = unbiased.std(ddof=1) / np.sqrt(trials), biased.std(ddof=1) / np.sqrt(trials)
    assert abs(unbiased.mean()) < 4 * se_u
    assert biased.mean() > 20 * se_b and biased.mean() > 0.2
    assert (unbiased < 0).any()                                      # unbiased: may go negative


def expected_cubic_kernel(a, b, d):
    """E (x.y/d + 1)^3 for independent x ~ N(a, I), y ~ N(b, I): with T = x.y, conditioning on y gives
    T | y ~ N(a.y, |y|^2), hence E T = a.b, E T^2 = (a.b)^2 + |a|^2 + |b|^2 + d and
    E T^3 = (a.b)^3 + 3 (a.b)(|a|^2 + |b|^2 + d + 2)."""
    ab, na, nb = a @ b, a @ a, b @ b
    t1, t2, t3 = ab, ab ** 2 + na + nb + d, ab ** 3 + 3 * ab * (na + nb + d + 2)
    return 1 + 3 * t1 / d + 3 * t2 / d ** 2 + t3 / d ** 3


def test_kid_mean_shift_matches_population_mmd():
    d = 8
    zero, mu = np.zeros(d), np.full(d, 0.5)
    # the analytic expectations, checked by Monte Carlo over 400k independent pairs (within 5 SE)
    rng = np.random.default_rng(7)
    for a, b in [(zero, zero), (mu, mu), (zero, mu)]:
        x, y = rng.standard_normal((400_000, d)) + a, rng.standard_normal((400_000, d)) + b
        v = ((x * y).sum(1) / d + 1) ** 3
        assert abs(v.mean() - expected_cubic_kernel(a, b, d)) < 5 * v.std() / np.sqrt(len(v))
    population = (expected_cubic_kernel(zero, zero, d) + expected_cubic_kernel(mu, mu, d)
                  - 2 * expected_cubic_kernel(zero, mu, d))
    assert population == pytest.approx(1.1171875)                    # 1.375 + 2.6796875 - 2 * 1.46875
    # kid on one full subset is the unbiased U-statistic: its mean over replications -> population value
    vals = []
    for s in range(16):
        r = np.random.default_rng(2000 + s)
        x, y = r.standard_normal((1000, d)), r.standard_normal((1000, d)) + mu
        vals.append(kid(x, y, subsets=1, subset_size=1000)[0])
    se = np.std(vals, ddof=1) / np.sqrt(len(vals))
    assert abs(np.mean(vals) - population) < 4 * se and se < 0.05 * population
    # subsampling: more, smaller subsets of one pair of sets stay consistent with the full-set value
    mean, std = kid(x, y, subsets=50, subset_size=200, seed=0)
    assert std > 0 and abs(mean - vals[-1]) < 4 * std / np.sqrt(50)


# ------------------------------------------------------------------------------- precision and recall

def pr_brute(real, fake, k):
    """Kynkäänniemi et al. 2019 by the definition, with explicit loops."""
    def radii(s):
        out = []
        for i in range(len(s)):
            d = sorted(np.linalg.norm(s[i] - s[j]) for j in range(len(s)) if j != i)
            out.append(d[k - 1])
        return np.array(out)

    def frac(q, s, r):
        return np.mean([any(np.linalg.norm(p - s[i]) <= r[i] for i in range(len(s))) for p in q])

    return frac(fake, real, radii(real)), frac(real, fake, radii(fake))


def circle(rng, n, lo=0.0, hi=2 * np.pi):
    t = rng.uniform(lo, hi, n)
    return np.stack([np.cos(t), np.sin(t)], 1)


def test_pr_hand_checked_1d():
    """real = {0, 2, 4, 6}, k = 1: every radius is 2. fake = {-2, 3, 8, 9}: -2 and 8 lie exactly on a
    radius (closed balls: inside), 3 inside, 9 outside -> precision 3/4. Fake radii (k = 1): -2 -> 5,
    3 -> 5, 8 -> 1, 9 -> 1; real 0 (2 from -2), 2, 4 (1 from 3) and 6 (3 from 3) are covered -> recall 1.
    With k = 2: real radii 4, 2, 2, 4 (to the 2nd nearest); fake 9 is 3 <= 4 from 6 -> precision 1; fake
    radii -2 -> 10, 3 -> 5, 8 -> 5, 9 -> 6 -> recall 1. Integer coordinates: distances are exact."""
    real = np.array([[0.0], [2.0], [4.0], [6.0]])
    fake = np.array([[-2.0], [3.0], [8.0], [9.0]])
    assert precision_recall(real, fake, k=1) == (0.75, 1.0)
    assert precision_recall(real, fake, k=2) == (1.0, 1.0)
    # swapped roles: precision and recall swap
    assert precision_recall(fake, real, k=1) == (1.0, 0.75)


def test_pr_hand_checked_2d():
    """real: the 4 corners of the unit square plus (10, 0); k = 1 -> corner radii 1, outlier radius 9
    (nearest corner (1, 0)). fake: (0.5, 0.5) inside (0.71 <= 1), (3, 0) inside the outlier's ball (7 <= 9),
    (-2, 0) outside (2 > 1 from (0, 0), 12 > 9 from (10, 0)), (0, 20) outside -> precision 2/4.
    Fake radii (k = 1): (0.5,.5) -> 2.55 (to (3,0)), (3,0) -> 2.55, (-2,0) -> 2.55 (to (0.5,.5)),
    (0,20) -> 19.5; corners are within 2.55 of (0.5, .5); (10, 0) is 7 from (3, 0) > 2.55 and
    sqrt(100 + 400) = 22.4 > 19.5 from (0, 20) -> recall 4/5."""
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [10, 0]], dtype=float)
    fake = np.array([[0.5, 0.5], [3, 0], [-2, 0], [0, 20]], dtype=float)
    assert precision_recall(real, fake, k=1) == (0.5, 0.8)
    assert pr_brute(real, fake, 1) == (0.5, 0.8)


@pytest.mark.parametrize("k,batch", [(1, 1), (3, 7), (3, 1024), (5, 16)])
def test_pr_matches_brute_force_any_batching(k, batch):
    rng = np.random.default_rng(8)
    real = rng.normal(size=(60, 4))
    fake = np.concatenate([rng.normal(0.7, 1.3, (40, 4)), real[:5]])       # duplicates of real rows too
    real = np.concatenate([real, real[:3]])                                # and duplicates within real
    expected = pr_brute(real, fake, k)
    assert precision_recall(real, fake, k=k, batch=batch) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_pr_circle_same_half_far():
    rng = np.random.default_rng(9)
    real = circle(rng, 2000)
    p, r = precision_recall(real, circle(rng, 2000))
    assert p > 0.95 and r > 0.95
    # half of the circle at the same density: inside the real manifold, covering about half of it
    # (binomial sd of the real points on the upper half sqrt(.25 / 2000) = 0.011; ball overhang ~0.01)
    p, r = precision_recall(torch.from_numpy(real), circle(rng, 1000, 0.0, np.pi))
    assert p > 0.95 and r == pytest.approx(0.5, abs=0.05)
    p, r = precision_recall(real, real + 100.0)
    assert (p, r) == (0.0, 0.0)


def test_pr_disk_same_distribution():
    """Uniform unit disk (a 2-D manifold, k = 3): the k-NN balls leave small gaps, both measures ~0.98."""
    def disk(rng, n):
        rad, t = np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
        return np.stack([rad * np.cos(t), rad * np.sin(t)], 1)

    rng = np.random.default_rng(10)
    p, r = precision_recall(disk(rng, 2000), disk(rng, 2000))
    assert 0.95 < p <= 1 and 0.95 < r <= 1
    p, r = precision_recall(disk(rng, 2000), 0.5 * disk(rng, 2000))        # fake: the inner quarter of the area
    assert p > 0.95 and 0.2 < r < 0.35


# ---------------------------------------------------------------------------------- streaming stats

def test_feature_stats_batching_and_merge_orders():
    rng = np.random.default_rng(11)
    x = rng.normal(3.0, 1.0, (1003, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = gaussian_stats(x)
    cuts = [0, 1, 3, 3, 500, 777, 1003]                                     # uneven, one empty batch
    parts = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    single = FeatureStats().add(x)
    stats = []
    for part in parts:
        s = FeatureStats()
        s.add(torch.from_numpy(part)) if len(part) % 2 else s.add(part)
        stats.append(s)
    results = [single]
    for order in [range(len(stats)), reversed(range(len(stats))), [3, 0, 5, 1, 4, 2]]:
        acc = FeatureStats()
        for i in order:
            acc.merge(FeatureStats.from_state_dict(stats[i].state_dict()))
        results.append(acc)
    streamed = FeatureStats(16)
    for part in parts:
        streamed.add(part)
    results.append(streamed)
    # states from "ranks" added element-wise (an all-reduce SUM) are a valid state too
    summed = {key: sum(s.state_dict()[key] for s in stats) for key in ("n", "sum", "outer")}
    results.append(FeatureStats.from_state_dict(summed))
    scale = np.abs(sigma).max()
    for res in results:
        assert res.n == 1003
        np.testing.assert_allclose(res.mean, mu, rtol=1e-10, atol=1e-10 * np.abs(mu).max())
        np.testing.assert_allclose(res.cov(), sigma, rtol=1e-10, atol=1e-10 * scale)
        assert np.array_equal(res.cov(), res.cov().T)


def test_feature_stats_state_dict_round_trip(tmp_path):
    x = np.random.default_rng(12).normal(size=(50, 8))
    s = FeatureStats().add(x[:20]).add(x[20:])
    state = s.state_dict()
    assert set(state) == {"n", "sum", "outer"}
    assert all(type(v) is np.ndarray for v in state.values())
    assert state["n"].dtype == np.int64 and state["sum"].dtype == state["outer"].dtype == np.float64
    state["sum"][0] += 1.0                                                   # a copy, not a view
    assert s.mean[0] != FeatureStats.from_state_dict(state).mean[0]
    state = s.state_dict()
    back = FeatureStats.from_state_dict(state)
    assert back.n == 50 and np.array_equal(back.mean, s.mean) and np.array_equal(back.cov(), s.cov())
    st = pytest.importorskip("safetensors.numpy")
    st.save_file(state, str(tmp_path / "stats.safetensors"))
    loaded = FeatureStats.from_state_dict(st.load_file(str(tmp_path / "stats.safetensors")))
    assert loaded.n == 50 and np.array_equal(loaded.cov(), s.cov())
    torch_state = {k: torch.from_numpy(v) for k, v in state.items()}
    assert np.array_equal(FeatureStats.from_state_dict(torch_state).cov(), s.cov())
    empty = FeatureStats.from_state_dict(FeatureStats().state_dict())
    assert empty.n == 0 and empty.merge(s).n == 50


# ------------------------------------------------------------------------------------------- errors

def test_errors():
    rng = np.random.default_rng(13)
    a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 6))
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_stats(a[:1])
    with pytest.raises(ValueError, match=r"must be \[N, D\] features"):
        gaussian_stats(a[0])
    with pytest.raises(ValueError, match="feature dimensions differ: set a has 8, set b has 6"):
        fid_from_features(a, b)
    with pytest.raises(ValueError, match="set b: need at least 2 samples"):
        fid_from_features(a, a[:1])
    with pytest.raises(ValueError, match="mu1 has 8, mu2 has 6"):
        fid(np.zeros(8), np.eye(8), np.zeros(6), np.eye(6))
    with pytest.raises(ValueError, match=r"sigma2 must be \[8, 8\]"):
        fid(np.zeros(8), np.eye(8), np.zeros(8), np.eye(7))
    bad = a.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="fake contains NaN or inf"):
        kid(a, bad)
    with pytest.raises(ValueError, match="real contains NaN or inf"):
        precision_recall(torch.from_numpy(a).float().index_fill(0, torch.tensor([0]), float("inf")), a)
    with pytest.raises(ValueError, match="set a contains NaN or inf"):
        fid_from_features(bad, a)
    with pytest.raises(ValueError, match="real has 8, fake has 6"):
        kid(a, b)
    with pytest.raises(ValueError, match="real has 8, fake has 6"):
        precision_recall(a, b)
    with pytest.raises(ValueError, match="subset_size must be an integer >= 2"):
        kid(a, a, subset_size=1)
    with pytest.raises(ValueError, match="fake needs at least 2 samples"):
        kid(a, a[:1])
    with pytest.raises(ValueError, match="k=3 needs more than k samples in fake, got 3"):
        precision_recall(a, a[:3])
    with pytest.raises(ValueError, match="k=20 needs more than k samples in real, got 20"):
        precision_recall(a, a, k=20)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        precision_recall(a, a, k=0)
    s = FeatureStats().add(a)
    with pytest.raises(ValueError, match="feature dimension 6 does not match 8"):
        s.add(b)
    with pytest.raises(ValueError, match="feature dimension 6 does not match 8"):
        s.merge(FeatureStats().add(b))
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats(8).add(a[:1]).cov()
    with pytest.raises(ValueError, match="no samples"):
        FeatureStats(8).mean
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        FeatureStats().add(bad)
    with pytest.raises(ValueError, match="missing keys"):
        FeatureStats.from_state_dict({"n": np.array(1)})
