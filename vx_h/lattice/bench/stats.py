"""Statistics for benchmark samples, in plain float arithmetic (no shell calculators, no truncation).

Sums use math.fsum (correctly rounded), the t quantile comes from Student's t CDF written with the
regularized incomplete beta function, so nothing here needs scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

from ..errors import LatticeError


class BenchError(LatticeError):
    """Bad benchmark input (too few samples, invalid token counts, non-positive times)."""


def slope_rates(n1: int, n2: int, times1: list[float], times2: list[float]) -> list[float]:
    """Decode tok/s of each paired run: (N2 - N1) / (T(N2) - T(N1)).

    Load, prefill and per-call overhead are in both times and cancel in the difference."""
    if not (0 <= n1 < n2):
        raise BenchError(f"slope needs 0 <= n1 < n2, got n1={n1}, n2={n2}")
    if len(times1) != len(times2) or not times1:
        raise BenchError(f"slope needs paired times, got {len(times1)} and {len(times2)}")
    rates = []
    for i, (t1, t2) in enumerate(zip(times1, times2)):
        if not t2 > t1:
            raise BenchError(f"run {i}: T(N2={n2}) = {t2!r} s is not greater than T(N1={n1}) = {t1!r} s; "
                             "the engine did not generate the requested tokens, or timing noise exceeds the difference "
                             "(use warm-up runs and a larger N2 - N1)")
        rates.append((n2 - n1) / (t2 - t1))
    return rates


def mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def stdev(xs: list[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0 for a single sample."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def trimmed_mean(xs: list[float], proportion: float = 0.1) -> float:
    """Mean after dropping floor(proportion * n) samples from each end (scipy's trim_mean rule)."""
    if not 0 <= proportion < 0.5:
        raise BenchError(f"trim proportion must be in [0, 0.5), got {proportion}")
    s = sorted(xs)
    cut = int(proportion * len(s))
    return mean(s[cut:len(s) - cut])


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        # even step
        aa = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        # odd step
        aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise BenchError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) == p, by bisection on the monotone CDF (to full float precision)."""
    if not 0.0 < p < 1.0:
        raise BenchError(f"quantile probability must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


@dataclass
class Summary:
    """Summary of one sample (tok/s of each run)."""
    n: int
    mean: float
    median: float
    trimmed_mean: float
    stdev: float
    ci_low: float
    ci_high: float
    min: float
    max: float
    spread_pct: float       # (max - min) / mean * 100

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(xs: list[float], confidence: float = 0.95, trim: float = 0.1) -> Summary:
    """Median, trimmed mean, stdev, a t-distribution confidence interval of the mean and the spread."""
    xs = [float(x) for x in xs]
    if not xs:
        raise BenchError("no samples to summarize")
    if not all(math.isfinite(x) for x in xs):
        raise BenchError(f"non-finite sample in {xs}")
    m, s, n = mean(xs), stdev(xs), len(xs)
    if n >= 2:
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * s / math.sqrt(n)
    else:
        half = math.inf      # one sample says nothing about its uncertainty
    return Summary(n=n, mean=m, median=median(xs), trimmed_mean=trimmed_mean(xs, trim), stdev=s,
                   ci_low=m - half, ci_high=m + half, min=min(xs), max=max(xs),
                   spread_pct=(max(xs) - min(xs)) / m * 100.0 if m else math.nan)


def degradation_pct(unloaded: float, loaded: float) -> float:
    """Throughput lost under load, in percent of the unloaded throughput (negative: it got faster)."""
    return (1.0 - loaded / unloaded) * 100.0
