"""Which objective the next training step serves: `MultiTaskSampler` and its strategies.

Every rank must train the same objective at the same step, or the collective calls inside the objectives
(gathers for ITC, gradient all-reduce) pair up wrongly and hang. The sampler agrees across ranks by
construction, without communication: every rank holds the same seed, the same draw counter and the same
observed losses (the caller all-reduces them before `observe`), and draw `k` is a pure function of
`(seed, k)` and the target probabilities. The counter makes resumption exact: `state_dict` saves it and
`load_state_dict` continues the identical sequence.

Strategies are small named classes with one method, `probabilities`, picked in YAML by class path:
`strategy: {class_path: vlp.platform.sampler.Temperature, init_args: {temperature: 2.0}}`.
Probabilities are computed in Python floats, so every rank computes bit-identical numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATE_VERSION = 1


@dataclass
class StrategyState:
    """What the sampler remembers between steps; plain data so it saves with `weights_only` loading.

    `draws` counts `sample` calls. `ema`, `ema_start` and `observations` hold, per objective, the smoothed
    loss, the smoothed loss once warm-up ended and the number of finite losses observed (used by `Adaptive`).
    """

    draws: int = 0
    ema: dict[str, float] = field(default_factory=dict)
    ema_start: dict[str, float] = field(default_factory=dict)
    observations: dict[str, int] = field(default_factory=dict)


class SamplingStrategy:
    """Maps objective names, dataset sizes and the sampler state to target probabilities (MMF style).

    Subclasses implement `probabilities`; a strategy that learns from losses also overrides `observe`.
    """

    def probabilities(
        self, names: list[str], sizes: dict[str, int], state: StrategyState
    ) -> dict[str, float]:
        """Target probability of each name (non-negative, summing to 1), in the order of `names`."""
        raise NotImplementedError

    def observe(self, losses: dict[str, float], state: StrategyState) -> None:
        """Update `state` from rank-reduced losses; strategies that ignore losses keep this no-op."""


def _uniform(names: list[str]) -> dict[str, float]:
    return {name: 1.0 / len(names) for name in names}


def _normalise(names: list[str], masses: dict[str, float], what: str) -> dict[str, float]:
    total = math.fsum(masses.values())
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"{what} must have a positive finite sum over objectives {names}, got {masses}")
    return {name: masses[name] / total for name in names}


def _softmax(names: list[str], logits: dict[str, float]) -> dict[str, float]:
    top = max(logits.values())
    return _normalise(names, {name: math.exp(logits[name] - top) for name in names}, "softmax masses")


class RoundRobin(SamplingStrategy):
    """Cycles the objectives in the given order, one step each; no randomness."""

    def probabilities(
        self, names: list[str], sizes: dict[str, int], state: StrategyState
    ) -> dict[str, float]:
        """Uniform: over a full cycle every objective is served equally often."""
        return _uniform(names)


class Proportional(SamplingStrategy):
    """p_i ∝ n_i: every example is seen about equally often, so small datasets are rarely trained."""

    def probabilities(
        self, names: list[str], sizes: dict[str, int], state: StrategyState
    ) -> dict[str, float]:
        """Dataset sizes normalised to sum to 1."""
        return _normalise(names, {name: float(sizes[name]) for name in names}, "dataset sizes")


class Temperature(SamplingStrategy):
    """p_i ∝ n_i^(1/T): T=1 is `Proportional`, larger T flattens towards uniform (T=inf is uniform).

    Args:
        temperature: T > 0; 2 to 5 is the usual range for multi-task and multilingual mixtures.
    """

    def __init__(self, temperature: float = 2.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def probabilities(
        self, names: list[str], sizes: dict[str, int], state: StrategyState
    ) -> dict[str, float]:
        """Computed in log space (exp(log n / T - max)) so large sizes cannot overflow."""
        if all(sizes[name] == 0 for name in names):
            raise ValueError(f"dataset sizes must not all be 0, got {sizes}")
        logits = {
            name: math.log(sizes[name]) / self.temperature if sizes[name] > 0 else -math.inf for name in names
        }
        return _softmax(names, logits)


class Weights(SamplingStrategy):
    """Fixed user weights, normalised to sum to 1; a weight of 0 switches an objective off.

    Args:
        weights: one non-negative finite weight per objective name, e.g. `{itc: 2, itm: 1, mlm: 1}`.
    """

    def __init__(self, weights: dict[str, float]) -> None:
        for name, weight in weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"weights[{name!r}] must be finite and >= 0, got {weight}")
        self.weights = {name: float(weight) for name, weight in weights.items()}

    def probabilities(
        self, names: list[str], sizes: dict[str, int], state: StrategyState
    ) -> dict[str, float]:
        """The weights normalised; every objective needs a weight and every weight an objective."""
        missing = [name for name in names if name not in self.weights]
        if missing:
            raise ValueError(
                f"weights has no entry for objective(s) {missing}; it has {sorted(self.weights)}"
            )
        unknown = [name for name in self.weights if name not in names]
        if unknown:
            raise ValueError(f"weights names unknown objective(s) {unknown}; objectives are {names}")
        if all(self.weights[name] == 0 for name in names):
            raise ValueError(f"weights must not all be 0 for objectives {names}, got {self.weights}")
        return _normalise(names, {name: self.weights[name] for name in names}, "weights")


class Adaptive(SamplingStrategy):
    """Trains more the objectives whose smoothed loss falls slowest, so no objective is left behind.

    Per objective i it keeps an EMA of the observed losses, `ema_i <- smoothing * ema_i + (1 - smoothing) * loss`
    (initialised to the first loss), and `start_i`, the EMA once i has been observed `warmup_observations`
    times. Its progress is the relative decrease `progress_i = (start_i - ema_i) / |start_i|` and

        q = softmax(-progress / tau),    p_i = floor + (1 - floor * len(names)) * q_i,

    so a flat loss (progress 0) is sampled more than a falling one (progress > 0), a rising loss more still,
    and every p_i >= floor. Until every objective has ended its warm-up the target is uniform. Non-finite
    losses are ignored (a skipped step must not poison the average). The result is a deterministic function
    of the observed losses, so ranks fed the same reduced losses agree.

    Args:
        floor: minimum probability of each objective; `floor * len(names)` must be <= 1.
        smoothing: EMA decay in [0, 1); 0 uses the latest loss alone.
        tau: softmax temperature on progress; smaller reacts more strongly (0.2: a 20 % gap in progress is a factor e).
        warmup_observations: losses an objective needs before its start EMA is fixed (>= 1).
    """

    def __init__(
        self, floor: float = 0.05, smoothing: float = 0.9, tau: float = 0.2, warmup_observations: int = 10
    ) -> None:
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if warmup_observations < 1:
            raise ValueError(f"warmup_observations must be >= 1, got {warmup_observations}")
        self.floor = float(floor)
        self.smoothing = float(smoothing)
        self.tau = float(tau)
        self.warmup_observations = int(warmup_observations)

    def probabilities(
        self, names: list[str], sizes: dict[str, int], state: StrategyState
    ) -> dict[str, float]:
        """Uniform during warm-up, then the floored softmax of negative progress (see the class docstring)."""
        if self.floor * len(names) > 1 + 1e-12:
            raise ValueError(
                f"floor * number of objectives must be <= 1, got floor={self.floor} for {len(names)} objectives"
            )
        if any(name not in state.ema_start for name in names):
            return _uniform(names)
        progress = {
            name: (state.ema_start[name] - state.ema[name]) / max(abs(state.ema_start[name]), 1e-12)
            for name in names
        }
        q = _softmax(names, {name: -progress[name] / self.tau for name in names})
        free = max(1.0 - self.floor * len(names), 0.0)
        return {name: self.floor + free * q[name] for name in names}

    def observe(self, losses: dict[str, float], state: StrategyState) -> None:
        """Fold each finite loss into its objective's EMA; fix the start EMA when warm-up ends."""
        for name, loss in losses.items():
            value = float(loss)
            if not math.isfinite(value):
                continue
            seen = state.observations.get(name, 0)
            state.ema[name] = (
                value if seen == 0 else self.smoothing * state.ema[name] + (1 - self.smoothing) * value
            )
            state.observations[name] = seen + 1
            if seen + 1 == self.warmup_observations:
                state.ema_start[name] = state.ema[name]


def _uniform_draw(seed: int, counter: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, counter): Philox is a counter-based generator."""
    raw = int(np.random.Philox(key=seed, counter=counter).random_raw())
    return (raw >> 11) * 2.0**-53


class MultiTaskSampler:
    """Picks the objective of every training step; seeded, resumable and identical on every rank.

    Args:
        strategy: how objectives are weighted; `None` means `RoundRobin()`.
        seed: the same on every rank; a non-negative integer below 2**64.
    """

    def __init__(self, strategy: SamplingStrategy | None = None, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.strategy = RoundRobin() if strategy is None else strategy
        self.seed = seed
        self.state = StrategyState()
        self._sizes: dict[str, int] | None = None

    def setup(self, sizes: dict[str, int]) -> None:
        """Fix the objectives (the keys, in the given order) and their dataset sizes; checks the strategy."""
        if not sizes:
            raise ValueError("sizes must name at least one objective, got {}")
        for name, size in sizes.items():
            if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"sizes must map objective names to integers >= 0, got {name!r}: {size!r}")
        self._sizes = dict(sizes)
        self.probabilities()

    @property
    def names(self) -> list[str]:
        """Objective names in the order given to `setup`."""
        return list(self._require_setup())

    def probabilities(self) -> dict[str, float]:
        """Current target probability of each objective (also what `train/sampler/p_<objective>` logs)."""
        sizes = self._require_setup()
        return self.strategy.probabilities(list(sizes), sizes, self.state)

    def sample(self) -> str:
        """Name of the objective the next step serves; advances the draw counter."""
        names = self.names
        draw = self.state.draws
        self.state.draws += 1
        if isinstance(self.strategy, RoundRobin):
            return names[draw % len(names)]
        probabilities = self.probabilities()
        u = _uniform_draw(self.seed, draw)
        cumulative = 0.0
        for name in names:
            cumulative += probabilities[name]
            if u < cumulative:
                return name
        return [name for name in names if probabilities[name] > 0][-1]

    def observe(self, losses: dict[str, float]) -> None:
        """Feed the latest losses, already reduced across ranks; only `Adaptive` uses them."""
        unknown = [name for name in losses if name not in self._require_setup()]
        if unknown:
            raise ValueError(f"observe got unknown objective(s) {unknown}; objectives are {self.names}")
        self.strategy.observe(losses, self.state)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats, strings, lists and dicts, loadable with `torch.load(..., weights_only=True)`."""
        return {
            "version": STATE_VERSION,
            "names": self.names,
            "seed": self.seed,
            "draws": self.state.draws,
            "ema": dict(self.state.ema),
            "ema_start": dict(self.state.ema_start),
            "observations": dict(self.state.observations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; the objectives must be the same, in the same order."""
        names = self.names
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version must be {STATE_VERSION}, got {state.get('version')!r}")
        if list(state["names"]) != names:
            raise ValueError(
                f"sampler state is for objectives {list(state['names'])}, this sampler has {names}"
            )
        unknown = {
            name for key in ("ema", "ema_start", "observations") for name in state[key] if name not in names
        }
        if unknown:
            raise ValueError(
                f"sampler state holds unknown objective(s) {sorted(unknown)}; objectives are {names}"
            )
        self.seed = int(state["seed"])
        self.state = StrategyState(
            draws=int(state["draws"]),
            ema={name: float(value) for name, value in state["ema"].items()},
            ema_start={name: float(value) for name, value in state["ema_start"].items()},
            observations={name: int(value) for name, value in state["observations"].items()},
        )

    def _require_setup(self) -> dict[str, int]:
        if self._sizes is None:
            raise RuntimeError("MultiTaskSampler.setup(sizes) must be called before using the sampler")
        return self._sizes
