"""The CLI builds its flags from the stage settings dataclasses."""
import dataclasses

import pytest

from defectlab import cli


@dataclasses.dataclass
class Toy:
    POSITIONAL = ("spec",)
    spec: str = ""                  # the spec file
    steps: int = 250                # sampling steps
    scale: float = 1.5              # guidance scale
    flip: bool = True               # random flips
    angles: tuple[int, ...] = (45, 65)  # rotation angles


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    cli.add_dataclass_args(p, Toy, positional=Toy.POSITIONAL)
    return cli.config_from_args(Toy, p.parse_args(list(argv)))


def test_flags_fill_the_dataclass_and_defaults_stay():
    assert parse() == Toy()
    cfg = parse("s.yaml", "--steps", "50", "--no-flip", "--angles", "10,20,30", "--scale", "4")
    assert cfg == Toy(spec="s.yaml", steps=50, scale=4.0, flip=False, angles=(10, 20, 30))


def test_help_shows_each_field_comment(capsys):
    import argparse

    p = argparse.ArgumentParser()
    cli.add_dataclass_args(p, Toy, positional=Toy.POSITIONAL)
    p.print_help()
    text = capsys.readouterr().out
    for words in ("sampling steps (default: 250)", "guidance scale", "--no-flip", "rotation angles"):
        assert words in text


def test_bad_type_exits_2():
    with pytest.raises(SystemExit) as err:
        parse("--steps", "many")
    assert err.value.code == 2


@pytest.mark.parametrize("command", ["finetune", "sample", "evaluate"])
def test_every_stage_help_lists_its_settings(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "--seed" in text or "--run" in text
