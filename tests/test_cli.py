"""Command-line parsing (no training)."""

import pytest

from distpddm.cli import build_parser, parse_args


def test_train_overrides_may_come_before_and_after_the_options():
    args = parse_args(build_parser(), ["train", "c.yaml", "a.b=1", "--address", "h:1", "ray.num_workers=0", "x.y=z"])
    assert str(args.config) == "c.yaml" and args.address == "h:1" and not args.local
    assert args.overrides == ["a.b=1", "ray.num_workers=0", "x.y=z"]  # in order: a later one wins
    args = parse_args(build_parser(), ["train", "c.yaml", "--local", "ray.storage_path=/s"])
    assert args.local and args.overrides == ["ray.storage_path=/s"]


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(build_parser(), ["train", "c.yaml", "--address", "h:1", "--bogus", "a=1"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # eval takes no overrides
        parse_args(build_parser(), ["eval", "run", "--shards", "s", "a=1"])
