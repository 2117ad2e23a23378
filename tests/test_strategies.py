"""Strategies: the one decision they make, and parsing their command-line spelling."""

from __future__ import annotations

import pytest
import torch

from selfmtp.decoding.strategies import NTP, ConfAdapt, Static, Strategy, parse_strategy
from selfmtp.errors import SelfMTPError


def test_ntp_and_static_accept_fixed_counts():
    assert NTP().k_max == 1 and NTP().accept(torch.tensor([0.01])) == 1
    assert Static(4).k_max == 4 and Static(4).accept(torch.tensor([0.1, 0.1, 0.1, 0.1])) == 4
    for strategy, spelled in ((NTP(), "ntp"), (Static(3), "static:3"), (ConfAdapt(0.9, 8), "confadapt:0.9:8")):
        assert isinstance(strategy, Strategy) and strategy.name == spelled and parse_strategy(spelled) == strategy


@pytest.mark.parametrize(
    ("confidences", "expected"),
    [
        ([0.1, 0.95, 0.95, 0.95], 1),  # a low first token ends the run, but one token is always kept
        ([0.99, 0.95, 0.5, 0.95], 2),  # the run stops at the first low confidence
        ([0.99, 0.95, 0.92, 0.91], 4),
        ([0.99, 0.95, 0.92, 0.91, 0.99], 4),  # never more than k_max
        ([0.99, 0.2, 0.99, 0.99], 1),
    ],
)
def test_confadapt_accepts_the_leading_confident_run(confidences, expected):
    assert ConfAdapt(0.9, k_max=4).accept(torch.tensor(confidences)) == expected


def test_parse_strategy_valid_spellings():
    assert parse_strategy("ntp") == NTP()
    assert parse_strategy(" Static:3 ") == Static(3)
    assert parse_strategy("confadapt:0.9") == ConfAdapt(0.9, 16)
    assert parse_strategy("confadapt:0.6:8") == ConfAdapt(0.6, 8)
    assert parse_strategy("confadapt:1") == ConfAdapt(1.0, 16)
    assert parse_strategy("confadapt:0.6:8").name == "confadapt:0.6:8"
    assert parse_strategy("static:1").name == "static:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("confadapt:0", "tau must be in (0, 1]"),
        ("confadapt:1.5", "tau must be in (0, 1]"),
        ("confadapt:-0.2", "tau must be in (0, 1]"),
        ("confadapt:nan", "tau must be in (0, 1]"),
        ("confadapt:abc", "must be a number"),
        ("confadapt:0.9:0", "k_max must be an integer >= 1"),
        ("confadapt:0.9:x", "must be an integer"),
        ("static:0", "static k must be an integer >= 1"),
        ("static:-2", "static k must be an integer >= 1"),
        ("static:two", "must be an integer"),
        ("static", "unknown strategy"),
        ("beam:4", "unknown strategy"),
        ("ntp:2", "unknown strategy"),
        ("", "unknown strategy"),
    ],
)
def test_parse_strategy_rejects_bad_strings(text, message):
    with pytest.raises(
        SelfMTPError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        parse_strategy(text)


@pytest.mark.parametrize(
    ("text", "capped_name"),
    [
        ("ntp", "ntp"),
        ("static:8", "static:8"),
        ("static:100000", "static:8"),
        ("confadapt:0.9:16", "confadapt:0.9:8"),
        ("confadapt:0.9:1000:adaptive", "confadapt:0.9:8:adaptive"),
        ("verify:5000000:tree:lookup", "verify:8:tree:lookup"),
        ("verify:3:lookup", "verify:3:lookup"),
    ],
)
def test_capped_bounds_every_kind_and_keeps_the_rest(text, capped_name):
    from selfmtp.decoding.strategies import capped

    strategy = capped(parse_strategy(text), 8)
    assert strategy.name == capped_name and strategy.k_max <= 8
    assert type(strategy) is type(parse_strategy(text))  # adaptive stays adaptive, tree and lookup stay
    with pytest.raises(SelfMTPError, match="cap must be >= 2"):
        capped(parse_strategy(text), 1)
