"""The command line as a user meets it: every flag documented with its default, and bad values of
preset and ``--set`` settings refused in one line (the other bad inputs: test_train, test_data)."""

import argparse

import pytest

from aaren_rl.cli import build_parser, main


def all_parsers(parser, prog="aaren-rl"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{prog} {name}")


def test_every_flag_of_every_command_says_what_it_does_and_its_default():
    missing = []
    for prog, parser in all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings \
                    or action.required:
                continue
            text = (action.help or "").lower()
            if len(text) < 10 or "default" not in text:
                missing.append(f"{prog} {action.option_strings[-1]}: {action.help!r}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("setting, expected", [
    ("model.embed_dim=abc", r"model.embed_dim must be an integer, got 'abc'"),
    ("model.embed_dim=\"32\"", r"model.embed_dim must be an integer, got '32'"),
    ("model.dropout=true", r"model.dropout must be a number, got True"),
    ("train.learning_rate=abc", r"train.learning_rate must be a number, got 'abc'"),
    ("train.max_episode_len=1.5", r"train.max_episode_len must be an integer \(or unset\), got 1.5"),
    ("train.amp=1", r"train.amp must be true or false, got 1"),
])
def test_a_setting_of_the_wrong_type_is_one_clear_line(tmp_path, setting, expected):
    with pytest.raises(SystemExit, match=expected):
        main(["train", "--dataset", "pendulum/medium", "--logdir", str(tmp_path / "r"), "--set", setting])


def test_a_preset_value_of_the_wrong_type_is_one_clear_line(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('[model]\nembed_dim = "32"\n')
    with pytest.raises(SystemExit, match=r"model.embed_dim must be an integer, got '32' \(agent preset"):
        main(["train", "--agent", str(preset), "--dataset", "pendulum/medium", "--logdir", str(tmp_path / "r")])


def test_compare_table_keeps_overrides_apart():
    """compare.py's table pools seeds per agent and --set overrides, also from files that predate
    the rows' "set" field (their overrides are read back from the saved command)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    assert compare._set_from_command("compare.py --seeds 0 --set train.learning_rate=3e-4 a.b=1") == \
        ["train.learning_rate=3e-4", "a.b=1"]
    assert compare._set_from_command("compare.py --set x=1 --out d") == ["x=1"]
    assert compare._set_from_command("compare.py --seeds 0") == []
    row = dict(dataset="d", agent="a", return_mean=0.0, policy_ms_per_step=1.0, train_seconds=1.0)
    rows = [{**row, "normalized_score_mean": 10.0, "seed": 0}, {**row, "normalized_score_mean": 20.0, "seed": 1},
            {**row, "normalized_score_mean": 90.0, "seed": 0, "set": ["train.learning_rate=3e-4"]}]
    text = compare.table(rows)
    assert "| a | 15.0 ± 5.0 (n=2)" in text
    assert "| a train.learning_rate=3e-4 | 90.0 ± 0.0 (n=1)" in text
