"""Every numeric config key is range-checked at load time (a walk over the schema)."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from common import config as cfg
from common.config import Config, ConfigError, from_dict


def _numeric_keys(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Every dotted key of the schema whose type is int or float."""
    found: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.update(_numeric_keys(tp, f"{prefix}{f.name}."))
        elif tp in (int, float):
            found[f"{prefix}{f.name}"] = tp
    return found


NUMERIC = _numeric_keys()


def test_every_numeric_key_has_a_range():
    assert set(NUMERIC) == set(cfg._RANGES), (
        f"keys without a range: {sorted(set(NUMERIC) - set(cfg._RANGES))}; "
        f"ranges without a key: {sorted(set(cfg._RANGES) - set(NUMERIC))}"
    )


def test_defaults_are_inside_their_ranges():
    flat = cfg.flatten(Config())
    outside = {k: flat[k] for k, interval in cfg._RANGES.items() if not interval.contains(flat[k])}
    assert outside == {}


def _refused(key: str, value) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict({}, {key: value})
    return str(info.value)


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_nan_is_refused_with_the_key_named(key):
    message = _refused(key, math.nan)
    assert key in message


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_infinities_are_refused_unless_the_range_holds_them(key):
    interval = cfg._RANGES[key]
    for value in (math.inf, -math.inf):
        if interval.contains(value):  # max_epsilon: inf means no limit
            assert NUMERIC[key] is float
            assert from_dict({}, {key: value}).__class__ is Config
        else:
            assert key in _refused(key, value)


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_just_below_the_range_is_refused_and_the_range_is_named(key):
    interval = cfg._RANGES[key]
    assert interval.low > -math.inf, f"{key}: no lower bound"
    if interval.low_open:
        below = interval.low  # the open end itself
    else:
        below = interval.low - (1 if NUMERIC[key] is int else 1e-9)
    message = _refused(key, below)
    assert key in message and str(interval) in message


@pytest.mark.parametrize("key", sorted(k for k, i in cfg._RANGES.items() if i.high < math.inf))
def test_just_above_the_range_is_refused(key):
    interval = cfg._RANGES[key]
    above = interval.high if interval.high_open else interval.high + 1e-9
    message = _refused(key, above)
    assert key in message and str(interval) in message


def test_interval_ends():
    beta = cfg.Interval(0, 1)
    assert beta.contains(0.0) and beta.contains(0.999) and not beta.contains(1.0)
    positive = cfg.Interval(0, low_open=True)
    assert not positive.contains(0.0) and positive.contains(1e-12) and not positive.contains(math.inf)
    assert str(beta) == "in [0, 1)" and str(positive) == "> 0 and finite"


@pytest.mark.parametrize(
    "override, named",
    [("algorithm.inner_lr=nan", "algorithm.inner_lr"), ("federation.round_timeout=-5", "federation.round_timeout"),
     ("server_opt.momentum=1", "server_opt.momentum"), ("runtime.num_cpus=0", "runtime.num_cpus")],
)
def test_the_command_exits_2_before_anything_starts(override, named, capsys):
    from simulations.cli import EXIT_USAGE, main

    assert main(["simulate", "--set", override]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert named in err and "must be" in err
