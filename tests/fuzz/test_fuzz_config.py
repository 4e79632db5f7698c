"""Fuzzed configuration: random YAML files and ``--set`` strings through ``resolve`` give a
config or one short line of ``ConfigError``, never another exception (cases:
tests/fuzz/cases.py). The documents below are the ones that used to escape as tracebacks,
hang, or fill the screen."""

from __future__ import annotations

import pytest
from hypothesis import given

from pipeline.config import Config, ConfigError, IngestConfig, resolve
from tests.fuzz.cases import TEMPLATES, config_cases, config_outcomes, fuzz_settings


@fuzz_settings(max_examples=200)
@given(case=config_cases)
def test_fuzzed_configs_resolve_or_fail_in_one_line(case):
    (outcome,) = config_outcomes(case)
    assert not outcome.bad, outcome.detail


def one_line(exc: ConfigError) -> str:
    text = str(exc)
    assert text and "\n" not in text and len(text) < 1000, text
    return text


@pytest.mark.parametrize("text", TEMPLATES)
def test_hostile_documents_fail_in_one_line(tmp_path, text):
    """Unparseable YAML, Python tags, several documents, impossible dates, alias bombs,
    nesting deeper than the parser's recursion (all were tracebacks or megabyte messages)."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    for args in ((str(path), []), (None, [f"data.input={text}"])):
        try:
            resolve(Config, *args)
        except ConfigError as exc:
            one_line(exc)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"train:\n  lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="config.yaml: not valid YAML") as info:
        resolve(Config, str(path))
    one_line(info.value)


def test_alias_bomb_is_described_in_a_short_line_at_once():
    """A 260-byte --set naming 10^8 values: its error took 9 s and 250 MB before."""
    bomb = "[" + ", ".join(["&a [l,l,l,l,l,l,l,l,l]"] + [
        f"&{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefg", "bcdefgh",
                                                                 strict=True)]) + "]"
    with pytest.raises(ConfigError, match="data.input: must be str") as info:
        resolve(Config, None, [f"data.input={bomb}"])
    assert len(str(info.value)) < 500  # a bounded repr, not 10^8 values spelled out
    one_line(info.value)


@pytest.mark.parametrize("overrides,field", [
    (["train.lr=&t {a: *t}", "train.lr=&t {a: *t}"], "train.lr.a: refers to itself"),
    (["train.lr=&a [*a]"], r"train.lr\[0\]: refers to itself"),
    (["train.lr=.nan"], "train.lr: must be a number"),
    (["train.seed=-1"], r"train.seed: must be in \[0, 2\*\*32\)"),
    (["=1"], "expected dotted.key=value"),
    (["train..lr=1"], "expected dotted.key=value"),
])
def test_values_that_broke_later_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field) as info:
        resolve(Config, None, overrides)
    one_line(info.value)


def test_keys_of_mixed_types_are_named():
    """``sorted`` of int and str keys raised TypeError."""
    with pytest.raises(ConfigError, match="1: unknown key"):
        resolve(IngestConfig, None, ["1=2", "x=3"])
