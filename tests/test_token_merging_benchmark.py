"""benchmarks/token_merging.py numbers its quality runs: repeat k of a (variant, seed) trains at the config's
learning rate x (1 + 0.001 k) and nothing else changes, so `--first-repeat K` adds runs to an earlier
results file's without rerunning repeat 0. Checked on the run list it builds; `fit` (minutes of training)
is replaced by a recorder."""

from __future__ import annotations

import pytest
from benchmark_script import load_benchmark


@pytest.fixture(scope="module")
def token_merging():
    return load_benchmark("token_merging")


def run_list(module, monkeypatch, **numbering) -> list[tuple[str, int, int, list[str]]]:
    """(variant, seed, repeat, overrides passed to fit) of every run quality_rows makes."""
    calls = []

    def recorded_fit(overrides, steps, batch_size, root, seed):
        calls.append(overrides)
        return {"t2i_r1": 0.5}

    monkeypatch.setattr(module, "fit", recorded_fit)
    rows = module.quality_rows({"a": ["--x=1"], "b": []}, [1], 10, 4, **numbering)
    return [
        (row["variant"], row["seed"], row["repeat"], overrides)
        for row, overrides in zip(rows, calls, strict=True)
    ]


def test_repeat_zero_runs_at_the_config_learning_rate(token_merging, monkeypatch):
    runs = run_list(token_merging, monkeypatch)
    assert runs == [("a", 1, 0, ["--x=1"]), ("b", 1, 0, [])]


def test_first_repeat_continues_the_numbering_and_its_learning_rates(token_merging, monkeypatch):
    base = token_merging.BASE_LR
    lr = {k: f"--model.init_args.optim.lr={base * (1 + 0.001 * k):.6g}" for k in (1, 2)}
    runs = run_list(token_merging, monkeypatch, repeats=2, first_repeat=1)
    assert runs == [
        ("a", 1, 1, ["--x=1", lr[1]]),
        ("b", 1, 1, [lr[1]]),
        ("a", 1, 2, ["--x=1", lr[2]]),
        ("b", 1, 2, [lr[2]]),
    ]
    # the same runs as the later repeats of one --repeats 3 run
    assert run_list(token_merging, monkeypatch, repeats=3)[2:] == runs
