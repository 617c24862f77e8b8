"""Config regexes run in bounded time and mean exactly what they mean to Python's ``re``."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import literal_regexes, module_names, regexes

from loraplug import _regex
from loraplug._peft_regex import fullmatcher, key_finder
from loraplug._regex import BoundedPattern, RegexRefused, work_limit


def peft_key(key: str) -> str:
    return rf"(.*\.)?({key})$"


def re_or_refused(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def re_error(pattern: str) -> str:
    """re's own message for an invalid pattern, as a ``match=`` regex."""
    try:
        re.compile(pattern)
    except re.error as err:
        return re.escape(str(err))
    raise AssertionError(f"{pattern!r} is valid")


@given(pattern=st.one_of(regexes, literal_regexes), names=st.lists(module_names, max_size=6))
@example(pattern=r"(.*\.)?(q|k)_proj$", names=["a.q_proj", "a.q_proj\n", "xq_proj"])
@example(pattern=r"(?i)ſ|\u212a", names=["s", "S", "k", "K"])
@example(pattern=r"^a\.b|b", names=["a.b", "x.a.b", "x.b", "b\n", "x\n.b"])
@example(pattern="", names=["", ".", "a.", "a\n."])
@example(pattern=r"\B", names=["", "a", "."])
def test_fullmatch_and_peft_keys_agree_with_re(pattern: str, names: list[str]) -> None:
    compiled = re_or_refused(pattern)
    if compiled is None:
        with pytest.raises(RegexRefused, match=re_error(pattern)) as info:
            fullmatcher(pattern)
        assert info.value.invalid
    else:
        match = fullmatcher(pattern)
        assert [match(n) for n in names] == [compiled.fullmatch(n) is not None for n in names]
    embedded = re_or_refused(peft_key(pattern))
    if embedded is None:  # "(?i)a" once embedded: global flags not at the start
        with pytest.raises(RegexRefused, match=re_error(peft_key(pattern))):
            key_finder((pattern,))
        return
    find = key_finder((pattern,))
    assert [find(n) for n in names] == [0 if embedded.match(n) else None for n in names]


@given(keys=st.lists(st.one_of(literal_regexes, regexes), min_size=1, max_size=4),
       names=st.lists(module_names, max_size=6))
def test_the_first_matching_key_wins_as_in_peft(keys: list[str], names: list[str]) -> None:
    compiled = [re_or_refused(peft_key(k)) for k in keys]
    if None in compiled:
        return
    find = key_finder(tuple(keys))
    for name in names:
        want = next((i for i, c in enumerate(compiled) if c and c.match(name)), None)
        assert find(name) == want


@pytest.mark.parametrize("pattern", [r"(.|.)*X", r"(a|aa)+$", r"(?:a*)*X", r".*.*.*.*.*.*.*.*.*.*X",
                                     r"(?:(?:a|a)*)*X", r"(\w+\s?)+$X"])
def test_catastrophic_patterns_finish_at_once(pattern: str) -> None:
    # Each of these keeps Python's re busy for minutes on a 40-character name.
    start = time.perf_counter()
    for n in range(40):
        name = "a" * n + ".b"
        assert not fullmatcher(pattern)(name)
        assert key_finder((pattern,))(name) is None
    assert time.perf_counter() - start < 2


def test_work_past_the_limit_is_refused_naming_the_pattern() -> None:
    pattern = "(?:[a-z.]?){400}X"
    names = [f"encoder.layer{i}.attention.output.dense" for i in range(50)]
    with work_limit(20_000), pytest.raises(RegexRefused, match=r"'\(\?:\[a-z\.\]\?\)\{400\}X': "
                                                               r"matching it against the module "
                                                               r"names took more than 20000"):
        for name in names:
            fullmatcher(pattern)(name)


@pytest.mark.parametrize(("pattern", "match"), [
    (r"(a)\1", "a backreference cannot be matched in bounded time"),
    (r"(a)?(?(1)b|c)", "a conditional group cannot be matched"),
    (r"(?>a+)b", "an atomic group cannot be matched"),
    (r"a++b", "a possessive quantifier cannot be matched"),
    ("x{100000}", f"it needs more than {_regex.MAX_PROGRAM} automaton states"),
    ("a" * (_regex.MAX_LENGTH + 1) + "*", f"characters long; at most {_regex.MAX_LENGTH}"),
    ("(" * 70 + "a" + ")" * 70, "it nests groups more than 64 deep"),
    ("(?:" * 3000 + "a" + ")" * 3000, r"it cannot be parsed \(RecursionError\)"),
    ("(?<=a+)b", "look-behind requires fixed-width pattern"),
    ("fc(", "missing \\), unterminated subpattern"),
])
def test_refused_patterns(pattern: str, match: str) -> None:
    with pytest.raises(RegexRefused, match=match):
        BoundedPattern(pattern)


def test_literal_patterns_of_any_length_match_as_strings() -> None:
    # save_adapter writes an alternation of every adapted layer's escaped name.
    names = [f"model.layers.{i}.mlp.{p}_proj" for i in range(400) for p in ("up", "down")]
    alternation = "|".join(re.escape(n) for n in names)
    assert len(alternation) > _regex.MAX_LENGTH
    assert all(fullmatcher(alternation)(n) for n in names)
    keys = tuple("^" + re.escape(n) for n in names)
    start = time.perf_counter()
    assert [key_finder(keys)(n) for n in names] == list(range(len(names)))
    assert time.perf_counter() - start < 2


@settings(max_examples=10)
@given(pattern=regexes)
def test_lookbehind_runs_against_the_whole_name(pattern: str) -> None:
    # A look-behind's own anchors refer to the whole string, not to the slice it reads.
    for text in (f"(?<=^a){pattern}", f"x(?<=\\bx){pattern}"):
        compiled = re_or_refused(text)
        if compiled is None:
            continue
        for name in ("a", "ab", "ba", "xa", "a.x", "x"):
            assert fullmatcher(text)(name) == (compiled.fullmatch(name) is not None)
