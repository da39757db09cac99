"""Sample-quality metrics over feature arrays: FID, KID, improved precision and recall.

Pure functions of ``[N, D]`` feature arrays (numpy arrays or torch tensors, any float or integer dtype);
everything is computed in float64. Which network made the features is not this module's business.

* **FID** -- Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", eq. (6): the Fréchet (2-Wasserstein) distance between the Gaussians fitted to the two
  feature sets, ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``.
* **KID** -- Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 4 / appendix: the unbiased estimator of
  the squared MMD (Gretton et al. 2012, eq. (3)) with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.
* **Precision / recall** -- Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models", eqs. (1)-(3): each set's manifold is the union of closed balls around its samples
  whose radius is the distance to the sample's k-th nearest neighbour in the same set (k = 3).

:class:`FeatureStats` accumulates the FID statistics of sets too large to hold at once, as float64 sums
that can be added across batches, files or ranks.

``kid`` and ``precision_recall`` run on the device of their inputs when a torch tensor on an accelerator is
passed (``precision_recall`` on 50k x 2048 features is ~10^13 multiply-adds per pass), otherwise on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["gaussian_stats", "fid", "fid_from_features", "kid", "precision_recall", "FeatureStats"]


# --------------------------------------------------------------------------------------------- inputs

def _as_numpy(x, name: str, ndim: int = 2) -> np.ndarray:
    """``x`` as a float64 numpy array of ``ndim`` dimensions with finite values, or a ValueError naming it."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: cannot be read as a float array ({e})") from None
    if x.ndim != ndim:
        what = "[N, D] features" if ndim == 2 else ("a [D] vector" if ndim == 1 else f"{ndim}-D")
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")
    if ndim == 2 and x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def _device(*xs) -> torch.device:
    """The first accelerator any tensor argument lives on, else the CPU."""
    for x in xs:
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return torch.device("cpu")


def _as_tensor(x, name: str, device: torch.device) -> torch.Tensor:
    """``x`` as a float64 ``[N, D]`` tensor on ``device`` with finite values, or a ValueError naming it."""
    if not isinstance(x, torch.Tensor):
        return torch.from_numpy(_as_numpy(x, name)).to(device)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D] features, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    x = x.detach().to(device, torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def _same_dim(a, b, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {na} has {a.shape[1]}, {nb} has {b.shape[1]}")


# ------------------------------------------------------------------------------------------------ FID

def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` in float64: the sample mean and the unbiased (``ddof=1``) covariance of
    ``feats [N, D]``, i.e. the Gaussian fitted to the features in FID (Heusel et al. 2017, sec. 4)."""
    x = _as_numpy(feats, "features")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {n}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = xc.T @ xc / (n - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix, negative eigenvalues (rounding) clipped to 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr (S1 S2)^{1/2}`` for symmetric PSD ``S1, S2``.

    ``S1 S2`` is similar to ``A S2 A`` with ``A = S1^{1/2}`` (``A^{-1} (A A S2) A``, and by continuity for
    singular ``S1``), which is symmetric PSD, so the eigenvalues of ``S1 S2`` are real and non-negative and
    ``Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(A S2 A))``. Computed with symmetric eigensolvers only: no
    complex parts, no failure on singular (N < D) covariances.
    """
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def fid(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet Inception Distance (Heusel et al. 2017, eq. 6) between ``N(mu1, sigma1)`` and
    ``N(mu2, sigma2)``: ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` in float64, clipped at 0.

    The trace of the matrix square root is taken from the eigenvalues of the symmetric PSD matrix
    ``S1^{1/2} S2 S1^{1/2}`` (see :func:`_trace_sqrt_product`). Covariances are symmetrised first.
    """
    mu1, mu2 = _as_numpy(mu1, "mu1", 1), _as_numpy(mu2, "mu2", 1)
    s1, s2 = _as_numpy(sigma1, "sigma1"), _as_numpy(sigma2, "sigma2")
    d = mu1.shape[0]
    if mu2.shape[0] != d:
        raise ValueError(f"feature dimensions differ: mu1 has {d}, mu2 has {mu2.shape[0]}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [{d}, {d}] to match the means, got shape {s.shape}")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    diff = mu1 - mu2
    value = float(diff @ diff) + float(np.trace(s1) + np.trace(s2)) - 2.0 * _trace_sqrt_product(s1, s2)
    return max(value, 0.0)


def fid_from_features(a, b) -> float:
    """FID between two feature sets ``[Na, D]`` and ``[Nb, D]`` (each needs at least 2 rows)."""
    xa, xb = _as_numpy(a, "set a"), _as_numpy(b, "set b")
    _same_dim(xa, xb, "set a", "set b")
    for name, x in (("set a", xa), ("set b", xb)):
        if x.shape[0] < 2:
            raise ValueError(f"{name}: need at least 2 samples for a covariance, got {x.shape[0]}")
    return fid(*gaussian_stats(xa), *gaussian_stats(xb))


# ------------------------------------------------------------------------------------------------ KID

def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bińkowski et al. 2018's KID kernel ``k(x, y) = (x.y / d + 1)^3`` for all row pairs."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between equal-size samples (Gretton et al. 2012, eq. 3; Bińkowski et al. 2018):
    ``1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i,y_j) - 2/m^2 sum_{i,j} k(x_i,y_j)``."""
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off = m * (m - 1)
    value = ((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
             - 2.0 * kxy.sum() / (m * m))
    return float(value.item())


def _int_at_least(fn: str, name: str, value, lo: int) -> None:
    if int(value) != value or value < lo:
        raise ValueError(f"{fn}: {name} must be an integer >= {lo}, got {value}")


def kid(real, fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): ``(mean, std)`` of the unbiased MMD^2 with the
    cubic kernel ``(x.y/d + 1)^3`` over ``subsets`` random subset pairs.

    Each subset pair takes ``m = min(subset_size, len(real), len(fake))`` rows without replacement from each
    set, drawn from ``numpy.random.default_rng(seed)`` in the order: for each subset, the real rows
    (``rng.choice(len(real), m, replace=False)``), then the fake rows. ``std`` is the population standard
    deviation (``ddof=0``) of the per-subset values, as in the reference implementations; it describes the
    subset-to-subset spread, not the standard error of the mean. The unbiased estimate can be negative.
    """
    dev = _device(real, fake)
    x, y = _as_tensor(real, "real", dev), _as_tensor(fake, "fake", dev)
    _same_dim(x, y, "real", "fake")
    _int_at_least("kid", "subsets", subsets, 1)
    _int_at_least("kid", "subset_size", subset_size, 2)
    nx, ny = x.shape[0], y.shape[0]
    for name, n in (("real", nx), ("fake", ny)):
        if n < 2:
            raise ValueError(f"kid: {name} needs at least 2 samples for the unbiased MMD, got {n}")
    m = min(int(subset_size), nx, ny)
    rng = np.random.default_rng(seed)
    values = np.empty(int(subsets), dtype=np.float64)
    for s in range(int(subsets)):
        ix = torch.from_numpy(rng.choice(nx, m, replace=False)).to(dev)
        iy = torch.from_numpy(rng.choice(ny, m, replace=False)).to(dev)
        values[s] = _mmd2_unbiased(x[ix], y[iy])
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------- precision and recall

def _sq_dists(a: torch.Tensor, a2: torch.Tensor, b: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` from precomputed squared norms, float64."""
    return (a2[:, None] + b2[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _knn_radii2(x: torch.Tensor, x2: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance of each row of ``x`` to its k-th nearest other row (itself excluded by index, so
    duplicates count as neighbours at distance 0), in ``batch x batch`` blocks."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, batch):
        e = min(s + batch, n)
        best = torch.full((e - s, k), float("inf"), dtype=x.dtype, device=x.device)
        for cs in range(0, n, batch):
            ce = min(cs + batch, n)
            d2 = _sq_dists(x[s:e], x2[s:e], x[cs:ce], x2[cs:ce])
            lo, hi = max(s, cs), min(e, ce)
            if lo < hi:                                   # this block holds some rows' self-distances
                r = torch.arange(lo, hi, device=x.device)
                d2[r - s, r - cs] = float("inf")
            best = torch.topk(torch.cat([best, d2], dim=1), k, dim=1, largest=False).values
        radii[s:e] = best.max(dim=1).values
    return radii


def _inside(q: torch.Tensor, q2: torch.Tensor, x: torch.Tensor, x2: torch.Tensor, radii2: torch.Tensor,
            batch: int) -> int:
    """How many rows of ``q`` lie in some closed ball ``||q - x_i|| <= radius_i``."""
    count = 0
    for s in range(0, q.shape[0], batch):
        e = min(s + batch, q.shape[0])
        hit = torch.zeros(e - s, dtype=torch.bool, device=q.device)
        for cs in range(0, x.shape[0], batch):
            ce = min(cs + batch, x.shape[0])
            hit |= (_sq_dists(q[s:e], q2[s:e], x[cs:ce], x2[cs:ce]) <= radii2[None, cs:ce]).any(dim=1)
        count += int(hit.sum().item())
    return count


def precision_recall(real, fake, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-3).

    ``f(phi, Phi) = 1`` if ``||phi - phi'|| <= ||phi' - NN_k(phi', Phi)||`` for some ``phi'`` in ``Phi``
    (the k-th nearest neighbour taken within ``Phi``, the sample itself excluded); precision is the mean of
    ``f(fake_j, real)`` over the fake samples, recall the mean of ``f(real_i, fake)`` over the real ones.

    Distances are float64, computed from ``||a||^2 + ||b||^2 - 2 a.b`` in ``batch x batch`` blocks, so
    memory is O(batch^2 + N D) and no N x N matrix is ever held. Compared as squared distances (monotone),
    with closed balls: a point exactly on a radius is inside.
    """
    dev = _device(real, fake)
    x, y = _as_tensor(real, "real", dev), _as_tensor(fake, "fake", dev)
    _same_dim(x, y, "real", "fake")
    _int_at_least("precision_recall", "k", k, 1)
    _int_at_least("precision_recall", "batch", batch, 1)
    k, batch = int(k), int(batch)
    for name, n in (("real", x.shape[0]), ("fake", y.shape[0])):
        if k >= n:
            raise ValueError(f"precision_recall: k={k} needs more than k samples in {name}, got {n}")
    x2, y2 = (x * x).sum(dim=1), (y * y).sum(dim=1)
    real_r2 = _knn_radii2(x, x2, k, batch)
    fake_r2 = _knn_radii2(y, y2, k, batch)
    precision = _inside(y, y2, x, x2, real_r2, batch) / y.shape[0]
    recall = _inside(x, x2, y, y2, fake_r2, batch) / x.shape[0]
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------- streaming stats

class FeatureStats:
    """Streaming FID statistics: ``n``, ``sum x`` and ``sum x x^T`` in float64.

    ``add`` batches in any split, ``merge`` accumulators (e.g. one per rank or per cached shard); the result
    is that of :func:`gaussian_stats` on the concatenation up to float rounding. Because the state is plain
    sums, states from several ranks can also be combined by adding their ``state_dict`` arrays element-wise
    (e.g. an all-reduce SUM). ``cov = (sum x x^T - n mu mu^T) / (n - 1)``; the subtraction loses about
    ``eps * (|mu| / std)^2`` relative precision per entry, negligible for network features in float64.
    """

    def __init__(self, dim: int | None = None):
        if dim is not None and (int(dim) != dim or dim < 1):
            raise ValueError(f"FeatureStats: dim must be a positive integer, got {dim}")
        self.dim = None if dim is None else int(dim)
        self._n = 0
        self._sum = None if dim is None else np.zeros(self.dim)
        self._outer = None if dim is None else np.zeros((self.dim, self.dim))

    def _init(self, dim: int) -> None:
        self.dim = dim
        self._sum, self._outer = np.zeros(dim), np.zeros((dim, dim))

    def add(self, feats) -> "FeatureStats":
        """Accumulate ``feats [N, D]`` (N may be 0). Returns ``self``."""
        x = _as_numpy(feats, "features")
        if self.dim is None:
            self._init(x.shape[1])
        elif x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: feature dimension {x.shape[1]} does not match {self.dim}")
        self._n += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add ``other``'s samples to this accumulator (in place). Returns ``self``."""
        if not isinstance(other, FeatureStats):
            raise ValueError(f"FeatureStats.merge: expected a FeatureStats, got {type(other).__name__}")
        if other.dim is None:
            return self
        if self.dim is None:
            self._init(other.dim)
        elif other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: feature dimension {other.dim} does not match {self.dim}")
        self._n += other._n
        self._sum += other._sum
        self._outer += other._outer
        return self

    @property
    def n(self) -> int:
        return self._n

    @property
    def mean(self) -> np.ndarray:
        if self._n < 1:
            raise ValueError("FeatureStats: no samples added, the mean is undefined")
        return self._sum / self._n

    def cov(self) -> np.ndarray:
        """Unbiased (``ddof=1``) covariance ``[D, D]``, float64."""
        if self._n < 2:
            raise ValueError(f"FeatureStats: need at least 2 samples for a covariance, got {self._n}")
        mu = self._sum / self._n
        c = (self._outer - self._n * np.outer(mu, mu)) / (self._n - 1)
        return 0.5 * (c + c.T)

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"n": int64 [], "sum": float64 [D], "outer": float64 [D, D]}`` (D = 0 while the dimension is
        unknown): plain numpy arrays, e.g. for ``safetensors.numpy.save_file``."""
        d = self.dim or 0
        return {"n": np.array(self._n, dtype=np.int64),
                "sum": np.zeros(d) if self._sum is None else self._sum.copy(),
                "outer": np.zeros((d, d)) if self._outer is None else self._outer.copy()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureStats":
        """Inverse of :meth:`state_dict` (numpy arrays or torch tensors)."""
        missing = {"n", "sum", "outer"} - set(state)
        if missing:
            raise ValueError(f"FeatureStats.from_state_dict: missing keys {sorted(missing)}")
        n_arr = state["n"].detach().cpu().numpy() if isinstance(state["n"], torch.Tensor) else np.asarray(state["n"])
        if n_arr.size != 1 or n_arr.reshape(()) < 0 or n_arr.reshape(()) != np.round(n_arr.reshape(())):
            raise ValueError(f"FeatureStats.from_state_dict: 'n' must be one non-negative integer, got {n_arr}")
        n = int(n_arr.reshape(()))
        s = _as_numpy(state["sum"], "state 'sum'", 1)
        d = s.shape[0]
        outer = np.asarray(_as_numpy(state["outer"], "state 'outer'", 2) if d else np.zeros((0, 0)))
        if outer.shape != (d, d):
            raise ValueError(f"FeatureStats.from_state_dict: 'outer' must be [{d}, {d}], got {outer.shape}")
        if d == 0:
            if n:
                raise ValueError(f"FeatureStats.from_state_dict: n={n} samples but feature dimension 0")
            return cls()
        out = cls(d)
        out._n, out._sum, out._outer = n, s.copy(), outer.copy()
        return out
