"""`kiln --help` and every subcommand's: one-line descriptions, help on every option,
defaults shown, and no reStructuredText markup."""

from __future__ import annotations

import argparse

import pytest

from kiln.cli import build_parser


def _commands(parser, path=("kiln",)):
    yield path, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from list(_commands(sub, (*path, name)))[1:]


COMMANDS = list(_commands(build_parser()))


@pytest.mark.parametrize("path,parser,summary", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_help_is_complete_and_plain(path, parser, summary):
    if len(path) > 1:
        assert summary, f"{' '.join(path)} has no one-line description in its parent's list"
    text = parser.format_help()
    assert "``" not in text, f"{' '.join(path)} --help shows reStructuredText quotes"
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help"
        if action.default not in (None, False, argparse.SUPPRESS, []):
            assert "default" in parser._get_formatter()._get_help_string(action), action
