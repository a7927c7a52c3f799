"""The one settings reader: defaults < config file < command line, one number and one boolean parser that refuse a bad
value (naming FILE:LINE: key=value for a config file, the flag on the command line), unknown keys named."""
from __future__ import annotations

import pytest

from darkprune.cli.common import setting_message
from darkprune.errors import DarkpruneError, SettingError
from darkprune.workflow.settings import (parse_boolean, parse_number, parse_numbers, parse_shard, parse_whole,
                                         pruning_settings)


def test_the_command_line_puts_its_flag_in_place_of_the_key():
    assert setting_message("exclude", "exclude 12: the cfg has layers 0..9") == "--exclude 12: the cfg has layers 0..9"
    assert setting_message("checkpoint_every", "checkpoint_every 0: must be at least 1") == \
        "--checkpoint-every 0: must be at least 1"
    # a key that only begins another word is not the key; a message without it gets the flag in front
    assert setting_message("rate", "rates must lie in (0, 1)") == "--rate: rates must lie in (0, 1)"
    assert setting_message("criterion", "'foo' is not one of l1, bn") == "--criterion: 'foo' is not one of l1, bn"


@pytest.mark.parametrize("text, expected", [("1", True), ("yes", True), ("On", True), ("0", False), ("false", False),
                                            ("", False), (True, True), (False, False)])
def test_boolean_words(text, expected):
    assert parse_boolean(text, "resume") is expected


def test_a_bad_boolean_is_refused_not_read_as_false():
    with pytest.raises(SettingError, match=r"^resume maybe: expected 1 or 0$") as info:
        parse_boolean("maybe", "resume")
    assert info.value.setting == "resume"
    with pytest.raises(DarkpruneError, match=r"^f.txt:3: merge=2: expected 1 or 0$"):
        parse_boolean("2", "merge", "f.txt:3")


def test_numbers():
    assert parse_number("0.5", "lr") == 0.5 and parse_number("", "lr") is None
    assert parse_whole(" 7 ", "iters") == 7 and parse_numbers("0.1, 0.2,", "rates") == [0.1, 0.2]
    assert parse_shard("2/4") == (2, 4)
    for bad, problem in (("nan", "finite"), ("x", "expected a number"), ("-1", "at least 0")):
        with pytest.raises(SettingError, match=problem):
            parse_number(bad, "lr", low=0.0)
    with pytest.raises(SettingError, match="whole number"):
        parse_whole("2.5", "iters")
    with pytest.raises(SettingError, match="at least 1"):
        parse_whole("0", "iters")
    with pytest.raises(SettingError, match="1 <= I <= N"):
        parse_shard("5/4")


def test_flags_over_config_over_defaults_and_unknown_keys_named(tmp_path):
    config = tmp_path / "run.conf"
    config.write_text("cfg=a.cfg\n# a comment\nlimit=7\nrates=0.5\nthreshhold=0.1\nno_prefix_cache=yes\n")
    with pytest.warns(UserWarning, match="threshhold"):
        s = pruning_settings("ana", {"config": str(config), "limit": 3}, ["rates", "limit", "criterion",
                                                                           "no_prefix_cache"])
    assert s["cfg"] == "a.cfg" and s.whole("limit") == 3 and s.numbers("rates") == [0.5]
    assert s["criterion"] == "l1" and s["no_prefix_cache"] is True
    assert s.where("rates") == f"{config}:4" and s.where("limit") is None
    config.write_text("cfg=a.cfg\nlimit=many\n")
    s = pruning_settings("ana", {"config": str(config)}, ["limit"])
    with pytest.raises(DarkpruneError, match=rf"^{config}:2: limit=many: expected a whole number$"):
        s.whole("limit")
    config.write_text("cfg=a.cfg\nmerge=perhaps\n")
    with pytest.raises(DarkpruneError, match=rf"^{config}:2: merge=perhaps: expected 1 or 0$"):
        pruning_settings("ana", {"config": str(config)}, ["merge"])


def test_finetune_refuses_a_bad_boolean_in_its_config(tmp_path, capsys):
    from darkprune.cli import main
    config = tmp_path / "finetune.conf"
    config.write_text(f"cfg={tmp_path / 'a.cfg'}\ndata={tmp_path / 'a.data'}\nresume=maybe\n")
    assert main(["finetune", "--config", str(config), "-w", str(tmp_path / "ws")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"darkprune finetune: error: {config}:3: resume=maybe: expected 1 or 0"
    assert not (tmp_path / "ws").exists()
