import numpy as np
import pytest

from lattice.errors import LatticeError, NumericalError, SamplingError
from lattice.sampling import SamplingParams, apply_penalties, sample


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(top_k=2.5),
    dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.0), dict(min_p=-0.1),
    dict(repetition_penalty=0.0), dict(seed=-1), dict(seed="x"), dict(presence_penalty=float("inf")),
])
def test_invalid_params_raise_value_error_naming_parameter(kwargs):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, LatticeError)
    assert next(iter(kwargs)) in str(e.value)


def test_greedy_picks_argmax_and_reports_logprob():
    logits = np.array([0.0, 3.0, 1.0], np.float32)
    tok, lp = sample(logits, SamplingParams(), np.random.default_rng(0))
    assert tok == 1
    assert lp == pytest.approx(3.0 - np.log(np.exp(logits).sum()), rel=1e-6)


def test_top_k_1_is_greedy_and_seeded_draws_reproduce():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=100).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=1)
    assert sample(logits, p, np.random.default_rng(1))[0] == int(np.argmax(logits))
    p = SamplingParams(temperature=0.9, seed=3)
    a = [sample(logits, p, np.random.default_rng(3))[0] for _ in range(3)]
    assert len(set(a)) == 1


def test_top_p_and_min_p_restrict_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    seen = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), rng)[0] for _ in range(200)}
    assert seen == {0, 1}
    seen = {sample(logits, SamplingParams(temperature=1.0, min_p=0.5), rng)[0] for _ in range(200)}
    assert seen == {0, 1}


def test_penalties():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    counts = np.array([1, 1, 0])
    out = apply_penalties(logits, counts, SamplingParams(repetition_penalty=2.0))
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    out = apply_penalties(logits, np.array([2, 0, 0]),
                          SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    np.testing.assert_allclose(out, [2.0 - 0.5 - 0.5, -2.0, 1.0])


def test_nan_logits_raise():
    with pytest.raises(NumericalError):
        sample(np.array([0.0, np.nan], np.float32), SamplingParams(), np.random.default_rng(0))
