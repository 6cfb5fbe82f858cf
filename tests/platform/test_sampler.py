"""MultiTaskSampler: target probabilities by hand, empirical frequencies, exact resumption, rank agreement."""

import io
import math
from collections import Counter

import pytest
import torch

from vlp.platform.sampler import (
    Adaptive,
    MultiTaskSampler,
    Proportional,
    RoundRobin,
    SamplingStrategy,
    Temperature,
    Weights,
)

SIZES = {"itc": 1000, "itm": 300, "mlm": 50, "caption": 10}


def make_sampler(
    strategy: SamplingStrategy | None, seed: int = 0, sizes: dict[str, int] = SIZES
) -> MultiTaskSampler:
    sampler = MultiTaskSampler(strategy, seed=seed)
    sampler.setup(sizes)
    return sampler


def feed_adaptive(sampler: MultiTaskSampler, steps: int) -> None:
    """itc's loss stays flat, the others fall at different rates."""
    for step in range(steps):
        sampler.observe(
            {"itc": 3.0, "itm": 3.0 * 0.99**step, "mlm": 3.0 * 0.995**step, "caption": 3.0 * 0.999**step}
        )


def kl_divergence(empirical: dict[str, float], target: dict[str, float]) -> float:
    return sum(p * math.log(p / target[name]) for name, p in empirical.items() if p > 0)


STRATEGIES = {
    "round_robin": RoundRobin(),
    "proportional": Proportional(),
    "temperature": Temperature(temperature=2.0),
    "weights": Weights({"itc": 4.0, "itm": 2.0, "mlm": 1.0, "caption": 1.0}),
    "adaptive": Adaptive(floor=0.05, warmup_observations=5),
}


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_empirical_frequencies_over_10k_draws_match_target(strategy: SamplingStrategy) -> None:
    sampler = make_sampler(strategy, seed=3)
    feed_adaptive(sampler, 100)
    target = sampler.probabilities()
    draws = 10_000
    counts = Counter(sampler.sample() for _ in range(draws))
    empirical = {name: counts[name] / draws for name in sampler.names}
    assert kl_divergence(empirical, target) < 1e-3
    assert set(counts) <= set(sampler.names)


def test_round_robin_cycles_names_in_given_order() -> None:
    sampler = make_sampler(None, sizes={"b": 1, "a": 5, "c": 2})
    assert [sampler.sample() for _ in range(7)] == ["b", "a", "c", "b", "a", "c", "b"]
    assert sampler.probabilities() == pytest.approx({"b": 1 / 3, "a": 1 / 3, "c": 1 / 3})


def test_proportional_and_temperature_match_hand_computation() -> None:
    sizes = {"a": 100, "b": 25, "c": 0}
    assert make_sampler(Proportional(), sizes=sizes).probabilities() == pytest.approx(
        {"a": 0.8, "b": 0.2, "c": 0}
    )
    # T=2: sqrt(100)=10, sqrt(25)=5 -> 2/3, 1/3; an empty dataset stays at 0.
    assert make_sampler(Temperature(2.0), sizes=sizes).probabilities() == pytest.approx(
        {"a": 2 / 3, "b": 1 / 3, "c": 0}
    )
    # T=3 on sizes 8 and 1: 2 and 1.
    assert make_sampler(Temperature(3.0), sizes={"a": 8, "b": 1}).probabilities() == pytest.approx(
        {"a": 2 / 3, "b": 1 / 3}
    )


def test_temperature_one_equals_proportional_and_large_approaches_uniform() -> None:
    proportional = make_sampler(Proportional()).probabilities()
    assert make_sampler(Temperature(1.0)).probabilities() == pytest.approx(proportional, rel=1e-12)
    uniform = {name: 0.25 for name in SIZES}
    assert make_sampler(Temperature(1e6)).probabilities() == pytest.approx(uniform, abs=1e-5)
    assert make_sampler(Temperature(math.inf)).probabilities() == uniform
    spreads = [
        max(p.values()) - min(p.values())
        for p in (make_sampler(Temperature(t)).probabilities() for t in (1, 2, 5))
    ]
    assert spreads[0] > spreads[1] > spreads[2]


def test_weights_are_normalised_and_zero_weight_is_never_drawn() -> None:
    sampler = make_sampler(Weights({"a": 2.0, "b": 1.0, "c": 0.0}), sizes={"a": 1, "b": 1, "c": 1})
    assert sampler.probabilities() == {"a": 2 / 3, "b": 1 / 3, "c": 0.0}
    assert "c" not in {sampler.sample() for _ in range(2000)}


SINGLE_OBJECTIVE_STRATEGIES = {
    **{name: strategy for name, strategy in STRATEGIES.items() if name != "weights"},
    "weights": Weights({"itc": 1.0}),
    "adaptive_floor_1": Adaptive(floor=1.0),
}


@pytest.mark.parametrize(
    "strategy", SINGLE_OBJECTIVE_STRATEGIES.values(), ids=SINGLE_OBJECTIVE_STRATEGIES.keys()
)
def test_single_objective_is_always_drawn(strategy: SamplingStrategy) -> None:
    sampler = make_sampler(strategy, sizes={"itc": 7})
    sampler.observe({"itc": 1.0})
    assert sampler.probabilities() == {"itc": pytest.approx(1.0)}
    assert {sampler.sample() for _ in range(500)} == {"itc"}


def draw_with_losses(sampler: MultiTaskSampler, steps: int) -> list[str]:
    """Draws as training would: each step's objective reports a loss that depends on the step."""
    drawn = []
    for _ in range(steps):
        name = sampler.sample()
        drawn.append(name)
        step = sampler.state.draws
        sampler.observe({name: 2.0 + math.sin(step) * 0.1 - (0.001 * step if name == "itm" else 0.0)})
    return drawn


@pytest.mark.parametrize("strategy_id", STRATEGIES.keys())
def test_state_dict_round_trip_continues_identical_sequence(strategy_id: str) -> None:
    sampler = make_sampler(STRATEGIES[strategy_id], seed=11)
    draw_with_losses(sampler, 137)
    state = sampler.state_dict()
    expected = draw_with_losses(sampler, 500)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    for loaded_state in (state, torch.load(buffer, weights_only=True)):
        resumed = make_sampler(STRATEGIES[strategy_id], seed=999)  # the seed comes back from the state
        resumed.load_state_dict(loaded_state)
        assert resumed.state_dict() == state
        assert draw_with_losses(resumed, 500) == expected
        assert resumed.state_dict() == sampler.state_dict()


def test_adaptive_ema_state_round_trips() -> None:
    sampler = make_sampler(Adaptive(warmup_observations=3))
    feed_adaptive(sampler, 50)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_sampler(Adaptive(warmup_observations=3))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state == sampler.state
    assert resumed.probabilities() == sampler.probabilities()
    assert resumed.probabilities() != pytest.approx({name: 0.25 for name in SIZES})


@pytest.mark.parametrize("strategy_id", ["proportional", "temperature", "weights", "adaptive"])
def test_simulated_ranks_with_same_seed_agree_and_different_seeds_differ(strategy_id: str) -> None:
    rank0, rank1 = (
        make_sampler(STRATEGIES[strategy_id], seed=5),
        make_sampler(STRATEGIES[strategy_id], seed=5),
    )
    other = make_sampler(STRATEGIES[strategy_id], seed=6)
    sequence0, sequence1 = [], []
    for step in range(300):
        sequence0.append(rank0.sample())
        sequence1.append(rank1.sample())
        reduced = {sequence0[-1]: 1.0 / (1 + step)}  # what an all-reduce hands every rank
        rank0.observe(reduced)
        rank1.observe(reduced)
    assert sequence0 == sequence1
    assert rank0.probabilities() == rank1.probabilities()
    assert [other.sample() for _ in range(300)] != sequence0


def test_adaptive_favours_flat_loss_over_falling_loss_and_floor_holds() -> None:
    sampler = make_sampler(
        Adaptive(floor=0.1, smoothing=0.9, warmup_observations=5), sizes={"flat": 1, "falling": 1}
    )
    for step in range(300):
        sampler.observe({"flat": 2.0, "falling": 2.0 * 0.98**step})
    p = sampler.probabilities()
    assert p["flat"] > 0.5 > p["falling"] >= 0.1
    assert sum(p.values()) == pytest.approx(1.0)
    counts = Counter(sampler.sample() for _ in range(2000))
    assert counts["flat"] > counts["falling"]


def test_adaptive_matches_hand_computation() -> None:
    sampler = make_sampler(
        Adaptive(floor=0.1, smoothing=0.0, tau=0.2, warmup_observations=1), sizes={"a": 1, "b": 1}
    )
    sampler.observe({"a": 2.0, "b": 2.0})
    sampler.observe({"a": 2.0, "b": 1.0})
    # progress a = 0, b = 0.5; q_a = 1 / (1 + exp(-0.5 / 0.2)); p = 0.1 + 0.8 q.
    q_a = 1 / (1 + math.exp(-2.5))
    assert sampler.probabilities() == pytest.approx(
        {"a": 0.1 + 0.8 * q_a, "b": 0.1 + 0.8 * (1 - q_a)}, rel=1e-12
    )


def test_adaptive_floor_binds_when_one_loss_explodes() -> None:
    sampler = make_sampler(
        Adaptive(floor=0.05, smoothing=0.0, warmup_observations=1), sizes={"a": 1, "b": 1, "c": 1}
    )
    sampler.observe({"a": 1.0, "b": 1.0, "c": 1.0})
    sampler.observe({"a": 1e6, "b": 0.5, "c": 0.0})
    p = sampler.probabilities()
    assert p["b"] == pytest.approx(0.05) and p["c"] == pytest.approx(0.05)
    assert p["a"] == pytest.approx(0.9)


def test_adaptive_is_uniform_until_every_objective_is_observed_and_ignores_non_finite_losses() -> None:
    sampler = make_sampler(Adaptive(smoothing=0.0, warmup_observations=1), sizes={"a": 1, "b": 1})
    sampler.observe({"a": 5.0})
    sampler.observe({"a": 1.0, "b": math.nan})
    assert sampler.probabilities() == {"a": 0.5, "b": 0.5}
    assert "b" not in sampler.state.ema
    sampler.observe({"b": 3.0})
    sampler.observe({"b": math.inf})
    assert sampler.state.ema == {"a": 1.0, "b": 3.0}
    assert sampler.probabilities()["b"] > sampler.probabilities()["a"]


def test_observe_is_a_no_op_for_loss_free_strategies() -> None:
    sampler = make_sampler(Proportional())
    before = sampler.probabilities()
    sampler.observe({"itc": 1.0})
    assert sampler.probabilities() == before
    assert sampler.state.ema == {}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 1.0, "b": -1.0}, "weights\\['b'\\] must be finite and >= 0"),
        ({"a": 1.0, "b": math.nan}, "weights\\['b'\\]"),
        ({"a": 1.0}, "no entry for objective\\(s\\) \\['b'\\]"),
        ({"a": 1.0, "b": 1.0, "x": 1.0}, "unknown objective\\(s\\) \\['x'\\]"),
        ({"a": 0.0, "b": 0.0}, "must not all be 0"),
    ],
)
def test_bad_weights_raise_naming_the_objective(weights: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_sampler(Weights(weights), sizes={"a": 1, "b": 1})


def test_adaptive_floor_too_large_raises_at_setup() -> None:
    with pytest.raises(ValueError, match="floor \\* number of objectives must be <= 1"):
        make_sampler(Adaptive(floor=0.3), sizes={"a": 1, "b": 1, "c": 1, "d": 1})
    make_sampler(Adaptive(floor=0.25), sizes={"a": 1, "b": 1, "c": 1, "d": 1})


def test_observe_with_unknown_objective_raises() -> None:
    with pytest.raises(ValueError, match="unknown objective\\(s\\) \\['vqa'\\]"):
        make_sampler(Adaptive()).observe({"itc": 1.0, "vqa": 1.0})


def test_load_state_dict_rejects_other_objectives() -> None:
    state = make_sampler(Proportional()).state_dict()
    with pytest.raises(ValueError, match="sampler state is for objectives"):
        make_sampler(Proportional(), sizes={"itc": 1, "vqa": 1}).load_state_dict(state)
    with pytest.raises(ValueError, match="sampler state is for objectives"):
        make_sampler(Proportional(), sizes=dict(reversed(SIZES.items()))).load_state_dict(state)
    state["ema"] = {"vqa": 1.0}
    with pytest.raises(ValueError, match="unknown objective\\(s\\) \\['vqa'\\]"):
        make_sampler(Proportional()).load_state_dict(state)


def test_use_before_setup_raises() -> None:
    sampler = MultiTaskSampler(Temperature())
    for call in (
        sampler.sample,
        sampler.probabilities,
        sampler.state_dict,
        lambda: sampler.observe({"a": 1.0}),
    ):
        with pytest.raises(RuntimeError, match="setup\\(sizes\\) must be called"):
            call()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Temperature(0.0), "temperature must be > 0"),
        (lambda: Adaptive(floor=-0.1), "floor must be in"),
        (lambda: Adaptive(smoothing=1.0), "smoothing must be in"),
        (lambda: Adaptive(tau=0.0), "tau must be > 0"),
        (lambda: Adaptive(warmup_observations=0), "warmup_observations must be >= 1"),
        (lambda: MultiTaskSampler(seed=-1), "seed must be an integer"),
        (lambda: make_sampler(Proportional(), sizes={}), "at least one objective"),
        (lambda: make_sampler(Proportional(), sizes={"a": -1}), "'a': -1"),
        (lambda: make_sampler(Proportional(), sizes={"a": 0}), "positive finite sum"),
        (lambda: make_sampler(Temperature(), sizes={"a": 0}), "must not all be 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
