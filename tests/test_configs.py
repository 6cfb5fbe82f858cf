"""Every shipped config parses and resolves (the objectives, data and callbacks it names exist)."""

from pathlib import Path

import pytest
import yaml

from vlp.cli import run as main

ROOT = Path(__file__).parents[1] / "configs"
# configs that only add to another one, with the one they add to
ADD_ONS = {ROOT / "pretrain" / "shapes-tiny-2cpu.yaml": ROOT / "pretrain" / "shapes-tiny.yaml"}
CONFIGS = sorted({*ROOT.glob("pretrain/*.yaml"), *ROOT.glob("finetune/*.yaml")} - set(ADD_ONS))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "class_path: vlp.tasks." in capsys.readouterr().out


@pytest.mark.parametrize("add_on", ADD_ONS, ids=[c.stem for c in ADD_ONS])
def test_add_on_config_resolves_on_top_of_its_base(add_on, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ADD_ONS[add_on]), "--config", str(add_on), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "class_path: vlp.tasks." in capsys.readouterr().out


def test_two_cpu_ranks_keep_the_default_global_batch(capsys):
    """shapes-tiny-2cpu.yaml splits the default's batch over its ranks: what trains is unchanged."""
    configs = {}
    for name, args in {
        "one": [],
        "two": ["--config", str(ROOT / "pretrain" / "shapes-tiny-2cpu.yaml")],
    }.items():
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "pretrain" / "shapes-tiny.yaml"), *args, "--print_config"])
        configs[name] = yaml.safe_load(capsys.readouterr().out)
    one, two = configs["one"], configs["two"]
    batch = {name: c["data"]["sources"]["shapes"]["init_args"]["batch_size"] for name, c in configs.items()}
    assert (one["trainer"]["devices"], two["trainer"]["devices"]) == (1, 2)
    assert batch["two"] * two["trainer"]["devices"] == batch["one"]
    assert two["trainer"]["strategy"]["class_path"] == "vlp.platform.strategies.DDPStrategy"
    for c in configs.values():
        c["data"]["sources"]["shapes"]["init_args"].pop("batch_size")
        for key in ("devices", "accelerator", "strategy"):
            c["trainer"].pop(key)
    assert one == two  # model, objectives, data and schedule: the same


def test_the_default_config_exists():
    assert any(c.name == "shapes-tiny.yaml" for c in CONFIGS)
