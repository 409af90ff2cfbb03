"""kvpack.study.workloads distributions beyond the paper's uniform data: seeded reproducibility and the
documented moments (mean, variance, tails, outlier-channel magnitudes), within tolerance.

The draws are seeded, so every tolerance here is checked against one fixed sample; the tolerances
are several standard errors wide, so a change of seed would still pass."""

import math

import pytest
import torch

from kvpack.study import workloads as w

NAMES = sorted(w.DISTRIBUTIONS)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_reproducible_and_seed_dependent(name):
    a = w.generate(name, 64, 96, seed=5)
    b = w.generate(name, 64, 96, seed=5)
    c = w.generate(name, 64, 96, seed=6)
    assert a.shape == (64, 96) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert bool(torch.isfinite(a).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_the_rounded_fp32_draw(name, dtype):
    x32 = w.generate(name, 32, 64, seed=2)
    x = w.generate(name, 32, 64, seed=2, dtype=dtype)
    assert x.dtype == w.resolve_dtype(dtype)
    assert torch.equal(x, x32.to(x.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_signature_and_errors(name):
    fn = w.DISTRIBUTIONS[name]
    assert torch.equal(fn(8, 16, seed=1, dtype="float32", device="cpu"), w.generate(name, 8, 16, seed=1))
    with pytest.raises(ValueError, match="positive"):
        fn(0, 16)
    with pytest.raises(ValueError, match="unknown distribution"):
        w.generate("cauchy", 8, 8)


def _f64(x):
    return x.double().flatten()


def test_uniform_moments():
    x = _f64(w.uniform(400, 500, seed=3))
    assert abs(float(x.mean())) < 0.005
    assert float(x.var()) == pytest.approx(1 / 3, rel=0.01)
    assert float(x.abs().max()) < 1.0


def test_gaussian_moments():
    x = _f64(w.gaussian(400, 500, seed=3))  # 200k samples: standard error of the mean 0.0022
    assert abs(float(x.mean())) < 0.01
    assert float(x.var()) == pytest.approx(1.0, rel=0.02)
    assert float((x.abs() > 3).double().mean()) == pytest.approx(0.0027, abs=0.0006)
    y = _f64(w.gaussian(200, 100, seed=3, std=2.5))
    assert float(y.std()) == pytest.approx(2.5, rel=0.02)


def _t3_tail(x: float) -> float:
    """P(|t_3| > x), in closed form: the t_3 CDF is 1/2 + (u / (1 + u^2) + atan(u)) / pi, u = x / sqrt(3)."""
    u = x / math.sqrt(3)
    return 1 - 2 * (u / (1 + u * u) + math.atan(u)) / math.pi


def test_student_t_moments_and_tails():
    x = _f64(w.student_t(500, 800, seed=3))  # 400k samples, nu = 3, rescaled to unit variance
    assert abs(float(x.mean())) < 0.01
    # the fourth moment is infinite, so the sample variance converges slowly: a loose check
    assert float(x.var()) == pytest.approx(1.0, rel=0.1)
    assert float(x.abs().mean()) == pytest.approx(2 / math.pi, rel=0.01)  # E|x| = sqrt(1/3) E|t_3|
    assert w.student_t_mean_abs(3) * w.student_t_scale(3) == pytest.approx(2 / math.pi)
    # tails: P(|x| > c) = P(|t_3| > c sqrt(3)), polynomial (a Gaussian's at c = 5 is 5.7e-7)
    for c in (2.0, 3.0, 5.0):
        assert float((x.abs() > c).double().mean()) == pytest.approx(_t3_tail(c * math.sqrt(3)), rel=0.1)
    assert float((x.abs() > 5).double().mean()) > 1000 * 5.7e-7


def test_student_t_parameters():
    y = _f64(w.student_t(300, 400, seed=1, nu=5, std=2.0))
    assert float(y.std()) == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="nu"):
        w.student_t(4, 4, nu=2)
    with pytest.raises(ValueError, match="nu"):
        w.student_t(4, 4, nu=3.5)


@pytest.mark.parametrize("D", [32, 128, 96])
def test_outlier_keys_channels(D):
    T = 4000
    x = w.outlier_keys(T, D, seed=4).double()
    channels, factors = w.outlier_layout(D)
    assert len(channels) == max(1, D // 32)
    assert bool(((factors >= 10) & (factors <= 50)).all())
    std = x.std(0)
    others = torch.ones(D, dtype=torch.bool)
    others[channels] = False
    # each outlier channel's std is its factor (3% ~ 4 standard errors for T=4000), the rest ~1
    assert torch.allclose(std[channels], factors.double(), rtol=0.03)
    assert torch.allclose(std[others], torch.ones(int(others.sum()), dtype=torch.float64), rtol=0.06)
    assert abs(float(x.mean())) < 0.05
    absmax = x.abs().amax(0)
    assert float(absmax[channels].min()) > 6 * float(absmax.median())  # the realmodel outlier criterion
    # the layout is a property of the "model" (layout_seed), not of the draw (seed)
    y = w.outlier_keys(T, D, seed=5).double()
    assert torch.allclose(y.std(0)[channels], factors.double(), rtol=0.03)


def test_outlier_layout_parameters():
    ch, f = w.outlier_layout(64, n_outliers=3, magnitude=(20, 20), layout_seed=7)
    assert len(ch) == 3 and torch.equal(f, torch.full((3,), 20.0))
    ch2, _ = w.outlier_layout(64, n_outliers=3, magnitude=(20, 20), layout_seed=8)
    assert not torch.equal(ch, ch2)
    with pytest.raises(ValueError, match="n_outliers"):
        w.outlier_layout(8, n_outliers=9)
    with pytest.raises(ValueError, match="magnitude"):
        w.outlier_layout(8, magnitude=(0, 5))


def test_queries_follow_the_family():
    q = w.queries("student_t", 16, 64, seed=3)
    assert q.shape == (16, 64) and q.dtype == torch.float32
    assert torch.equal(q, w.student_t(16, 64, seed=3))
    # outlier channels belong to keys: the queries of outlier_keys come from its Gaussian base
    assert torch.equal(w.queries("outlier_keys", 16, 64, seed=3), w.gaussian(16, 64, seed=3))
