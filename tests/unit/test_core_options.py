"""Option validation: every bad value is rejected with the field it is about."""

import pytest

from atman_vllm.core import ExplainOptions, Granularity, InvalidRequestError, Mode


@pytest.mark.parametrize("kwargs, field", [
    (dict(factor=0), "factor"),
    (dict(factor=-1), "factor"),
    (dict(factor=float("nan")), "factor"),
    (dict(factor=float("inf")), "factor"),
    (dict(factor="x"), "factor"),
    (dict(factor="0.5"), "factor"),  # numbers are numbers: a string is refused, not coerced
    (dict(factor=True), "factor"),  # bool is an int subclass in Python; true would silently mean 1.0
    (dict(factor=0.99e-6), "factor"),  # below MIN_FACTOR
    (dict(factor=100.5), "factor"),  # above MAX_FACTOR
    (dict(kappa=True), "kappa"),
    (dict(mode="additive"), "mode"),
    (dict(kappa=1.5), "kappa"),
    (dict(kappa=-0.1), "kappa"),
    (dict(kappa=float("nan")), "kappa"),
    (dict(kappa="high"), "kappa"),
    (dict(granularity="letter"), "granularity"),
    (dict(granularity="custom"), "delimiter"),
    (dict(granularity="custom", delimiter=""), "delimiter"),
    (dict(granularity="word", delimiter=5), "delimiter"),
    (dict(granularity="spans"), "spans"),
    (dict(granularity="spans", spans=()), "spans"),
    (dict(granularity="word", spans=((0, 1),)), "spans"),
    (dict(spans=(("a", 1),)), "spans"),
    (dict(spans=((0.5, 1),)), "spans"),
    (dict(spans=((0, 1, 2),)), "spans"),
    (dict(spans="0:3"), "spans"),
    (dict(target_granularity="sentence"), "target_granularity"),
    (dict(postprocessing="cube"), "postprocessing"),
    (dict(normalize="yes"), "normalize"),
])
def test_bad_option_names_its_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        ExplainOptions(**kwargs).validated()
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")


def test_good_options_are_coerced():
    o = ExplainOptions(factor=1, mode="multiplicative", kappa=1, spans=[[0, 2]]).validated()
    assert o.factor == 1.0 and isinstance(o.factor, float) and o.mode is Mode.MULTIPLICATIVE and o.kappa == 1.0
    assert o.granularity is Granularity.SPANS and o.spans == ((0, 2),)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(InvalidRequestError) as e:
        ExplainOptions.from_dict({"factr": 0.1})
    assert e.value.field == "factr"
    o = ExplainOptions(granularity="custom", delimiter="|", normalize=True).validated()
    assert ExplainOptions.from_dict(o.to_dict()) == o


def test_factor_range_ends_are_accepted():
    from atman_vllm.core.options import MAX_FACTOR, MIN_FACTOR

    assert ExplainOptions(factor=MIN_FACTOR).validated().factor == MIN_FACTOR
    assert ExplainOptions(factor=MAX_FACTOR).validated().factor == MAX_FACTOR
