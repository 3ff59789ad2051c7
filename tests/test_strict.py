"""The strict reader quotas and hyper-parameters share (``adapters.strict``): the same refusals,
worded by each, for unknown keys, non-objects and numbers that are not what a field needs."""

from __future__ import annotations

import math

import pytest

from adapters.quotas import QuotaError, TenantQuotas
from adapters.strict import is_number, is_whole
from adapters.training.hyperparams import HyperparameterError, Hyperparameters

READERS = [(TenantQuotas.from_dict, QuotaError, "quotas", "quota"),
           (Hyperparameters.from_dict, HyperparameterError, "hyperparameters", "hyperparameter")]


def test_numbers_and_whole_numbers() -> None:
    assert [is_number(v) for v in (1, 2.5, math.nan, math.inf, True, "1", None)] == [True] * 4 + [False] * 3
    assert [is_whole(v) for v in (3, 3.0, 10**400, 2.5, math.nan, -math.inf, False)] == [True] * 3 + [False] * 4


@pytest.mark.parametrize("read,error,what,noun", READERS)
def test_both_readers_refuse_alike(read, error, what, noun) -> None:
    assert read(None) == read({})  # None is the defaults
    with pytest.raises(error) as e:
        read([1])
    assert (e.value.param, e.value.message) == (what, f"{what} must be an object")
    with pytest.raises(error) as e:
        read({"nope": 1})
    assert e.value.param == f"{what}.nope" and e.value.message.startswith(f"unknown {noun} 'nope'; known: ")
    with pytest.raises(error) as e:
        read({"\ud800\n": 1})  # no lone surrogate or control character reaches the message
    assert "'\\ud800\\n'" in e.value.message
    e.value.message.encode("utf-8")
    # param: as it always was, quotas leave such a key out, hyper-parameters keep it (escaped by the HTTP layer)
    assert e.value.param == (what if what == "quotas" else f"{what}.\ud800\n")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10**400, 2.5, True])
def test_a_count_that_is_not_a_whole_number_is_refused_naming_it(value) -> None:
    # an infinite or NaN epoch count once escaped as OverflowError / a bare ValueError (a 500)
    with pytest.raises(HyperparameterError) as e:
        Hyperparameters.from_dict({"epochs": value})
    assert e.value.param == "hyperparameters.epochs"
    with pytest.raises(QuotaError) as q:
        TenantQuotas.from_dict({"max_adapters": value})
    assert q.value.param == "quotas.max_adapters"
