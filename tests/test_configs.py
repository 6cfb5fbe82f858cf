"""Every shipped config parses and resolves (the objectives, data and callbacks it names exist)."""

from pathlib import Path

import pytest
import yaml

from vlp.cli import run as main

ROOT = Path(__file__).parents[1] / "configs"
DEFAULT = ROOT / "pretrain" / "shapes-tiny.yaml"
TWO_CPU = ROOT / "pretrain" / "shapes-tiny-2cpu.yaml"  # adds to DEFAULT only: tested on top of it below
CONFIGS = sorted({*ROOT.glob("pretrain/*.yaml"), *ROOT.glob("finetune/*.yaml")} - {TWO_CPU})


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "class_path: vlp.tasks." in capsys.readouterr().out


def test_two_cpu_ranks_keep_the_default_global_batch(capsys):
    """shapes-tiny-2cpu.yaml resolves on top of the default and splits its batch
    over its ranks: what trains is unchanged."""
    configs = {}
    for name, args in {"one": [], "two": ["--config", str(TWO_CPU)]}.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(DEFAULT), *args, "--print_config"])
        output = capsys.readouterr()
        assert exit_info.value.code == 0, output.err
        assert "class_path: vlp.tasks." in output.out
        configs[name] = yaml.safe_load(output.out)
    one, two = configs["one"], configs["two"]
    batch = {name: c["data"]["sources"]["shapes"]["init_args"]["batch_size"] for name, c in configs.items()}
    assert (one["trainer"]["devices"], two["trainer"]["devices"]) == (1, 2)
    assert batch["two"] * two["trainer"]["devices"] == batch["one"]
    assert two["trainer"]["strategy"]["class_path"] == "vlp.platform.distributed.strategies.DDPStrategy"
    for c in configs.values():
        c["data"]["sources"]["shapes"]["init_args"].pop("batch_size")
        for key in ("devices", "accelerator", "strategy"):
            c["trainer"].pop(key)
    assert one == two  # model, objectives, data and schedule: the same


def test_the_default_config_exists():
    assert any(c.name == "shapes-tiny.yaml" for c in CONFIGS)


OVERLAYS = sorted(ROOT.glob("overlays/*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[c.stem for c in OVERLAYS])
def test_overlay_on_the_default_keeps_every_objective_and_its_settings(overlay, capsys):
    """An overlay changes what it names and nothing else: the default's objectives and their settings stay."""
    resolved = {}
    for name, args in {"default": [], "overlaid": ["--config", str(overlay)]}.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(DEFAULT), *args, "--print_config"])
        output = capsys.readouterr()
        assert exit_info.value.code == 0, output.err
        resolved[name] = yaml.safe_load(output.out)["model"]["init_args"]
    default, overlaid = resolved["default"], resolved["overlaid"]
    named = yaml.safe_load(overlay.read_text())["model"]["init_args"].get("objectives", {})
    assert set(overlaid["objectives"]) == set(default["objectives"])
    for name, objective in default["objectives"].items():
        changed = overlaid["objectives"][name]["init_args"]
        own = (named.get(name) or {}).get("init_args") or {}  # what the overlay sets itself
        for key, value in objective["init_args"].items():
            assert changed[key] == own.get(key, value), (name, key)
    for key in ("mode", "loss_weights", "row_fractions", "optim"):
        assert overlaid[key] == default[key]
