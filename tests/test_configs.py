"""Every shipped config parses and resolves (the objectives, data and callbacks it names exist)."""

from pathlib import Path

import pytest

from vlp.cli import run as main

ROOT = Path(__file__).parents[1] / "configs"
CONFIGS = sorted([*ROOT.glob("pretrain/*.yaml"), *ROOT.glob("finetune/*.yaml")])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "class_path: vlp.tasks." in capsys.readouterr().out


def test_the_default_config_exists():
    assert any(c.name == "shapes-tiny.yaml" for c in CONFIGS)
