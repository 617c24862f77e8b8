"""Regular expressions from adapter files, matched in bounded time.

PEFT's config matches module names with Python regexes (``target_modules``,
``exclude_modules``, ``rank_pattern``, ``alpha_pattern``). Python's ``re`` backtracks:
``(.|.)*X`` takes minutes on one module name, so a hostile file could hang the loader.
Here a pattern is parsed by Python's own parser (so the syntax and every character class
mean exactly what they mean to ``re``) and run as a Thompson automaton: all alternatives
advance together, one character at a time, and the sets of states met are cached as a
lazily built DFA. The work per name is at most (name length) × (program size), and a
program is at most :data:`MAX_PROGRAM` instructions after counted repeats are expanded.
Constructs with no bounded-time meaning (backreferences, conditional groups, atomic
groups, possessive quantifiers) are refused; lookarounds run as sub-automata.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

if sys.version_info >= (3, 11):
    from re import _compiler as sre_compile  # type: ignore[attr-defined]
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
else:  # pragma: no cover - Python 3.10
    import sre_compile
    import sre_constants as sre
    import sre_parse

#: Longest pattern accepted, in characters.
MAX_LENGTH = 20_000
#: Most automaton instructions a pattern may compile to (counted repeats expanded).
MAX_PROGRAM = 20_000
#: Deepest nesting of groups, repeats and lookarounds.
MAX_DEPTH = 64
#: Automaton states one :func:`work_limit` block may visit (a few seconds at most).
MAX_WORK = 2_000_000
_MAX_HELD = 2_000_000

_CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)
_CHAR_OPS = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN, sre.CATEGORY)
_REFUSED = {
    sre.GROUPREF: "a backreference",
    sre.GROUPREF_EXISTS: "a conditional group",
    getattr(sre, "ATOMIC_GROUP", None): "an atomic group",
    getattr(sre, "POSSESSIVE_REPEAT", None): "a possessive quantifier",
}
_LINE_FLAGS = sre.SRE_FLAG_MULTILINE
_TYPE_FLAGS = sre.SRE_FLAG_ASCII | sre.SRE_FLAG_LOCALE | sre.SRE_FLAG_UNICODE
_CHAR_FLAGS = (sre.SRE_FLAG_IGNORECASE | sre.SRE_FLAG_DOTALL | sre.SRE_FLAG_ASCII
               | sre.SRE_FLAG_UNICODE)


class RegexRefused(ValueError):
    """A pattern that is invalid (``invalid``: ``re`` rejects it), too large, or has no
    bounded-time meaning."""

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


_BUDGET: ContextVar[list[int] | None] = ContextVar("loraplug_regex_budget", default=None)


@contextlib.contextmanager
def work_limit(steps: int | None = None) -> Iterator[None]:
    """Within the block, matching visits at most ``steps`` automaton states in all
    (:data:`MAX_WORK` by default); past that, the match raises :class:`RegexRefused`."""
    steps = MAX_WORK if steps is None else steps
    token = _BUDGET.set([steps, steps])
    try:
        yield
    finally:
        _BUDGET.reset(token)


# An assertion tests position ``i`` of string ``s``.
Assertion = Callable[[str, int], bool]


class _Builder:
    """Compiles a parsed pattern into instructions: (op, a, b)."""

    def __init__(self) -> None:
        self.code: list[list[Any]] = []
        self.lookaround = False
        self.looks_ahead = False  # an assertion reads the character after its position

    def emit(self, op: int, a: Any = None, b: Any = None) -> int:
        if len(self.code) >= MAX_PROGRAM:
            raise RegexRefused(f"it needs more than {MAX_PROGRAM} automaton states")
        self.code.append([op, a, b])
        return len(self.code) - 1

    def sequence(self, items: list, flags: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise RegexRefused(f"it nests groups more than {MAX_DEPTH} deep")
        for op, av in items:
            if op in _CHAR_OPS:
                self.emit(_CHAR, _char_test(op, av, flags))
            elif op is sre.BRANCH:
                self.branch(av[1], flags, depth)
            elif op is sre.SUBPATTERN:
                _, add, remove, body = av
                self.sequence(body, _scoped(flags, add, remove), depth + 1)
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
                low, high, body = av
                self.repeat(low, high, body, flags, depth)
            elif op is sre.AT:
                self.emit(_ASSERT, _anchor(av, flags, self))
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                self.emit(_ASSERT, _lookaround(av, op is sre.ASSERT_NOT, flags, depth))
                self.lookaround = True
            else:
                raise RegexRefused(f"{_REFUSED.get(op, str(op))} cannot be matched in bounded "
                                   "time")

    def branch(self, alternatives: list, flags: int, depth: int) -> None:
        jumps = []
        for alt in alternatives[:-1]:
            split = self.emit(_SPLIT, len(self.code) + 1)
            self.sequence(alt, flags, depth + 1)
            jumps.append(self.emit(_JMP))
            self.code[split][2] = len(self.code)
        self.sequence(alternatives[-1], flags, depth + 1)
        for jump in jumps:
            self.code[jump][1] = len(self.code)

    def repeat(self, low: int, high: int, body: list, flags: int, depth: int) -> None:
        # Greedy or lazy, the language is the same: only whether a match exists matters.
        for _ in range(low):
            self.sequence(body, flags, depth + 1)
        if high is sre.MAXREPEAT:
            loop = self.emit(_SPLIT, len(self.code) + 1)
            self.sequence(body, flags, depth + 1)
            self.emit(_JMP, loop)
            self.code[loop][2] = len(self.code)
            return
        splits = []
        for _ in range(high - low):
            splits.append(self.emit(_SPLIT, len(self.code) + 1))
            self.sequence(body, flags, depth + 1)
        for split in splits:
            self.code[split][2] = len(self.code)


def _scoped(flags: int, add: int, remove: int) -> int:
    # (?a:...), (?u:...) replace the character-type flag; as re's compiler does.
    if add & _TYPE_FLAGS:
        flags &= ~_TYPE_FLAGS
    return (flags | add) & ~remove


def _char_test(op: object, av: object, flags: int) -> Callable[[str], bool]:
    # Python's own compiler builds a one-character pattern for the node, so case folding,
    # categories and ranges mean exactly what they mean to re; results are cached.
    state = sre_parse.State()
    state.flags = flags & _CHAR_FLAGS
    node: Any = (op, av)
    compiled = sre_compile.compile(sre_parse.SubPattern(state, [node]))
    cache: dict[str, bool] = {}

    def test(ch: str) -> bool:
        hit = cache.get(ch)
        if hit is None:
            hit = cache[ch] = compiled.fullmatch(ch) is not None
        return hit

    return test


def _anchor(code: object, flags: int, builder: _Builder) -> Assertion:
    multiline = bool(flags & _LINE_FLAGS)
    if code in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
        if code is sre.AT_BEGINNING and multiline:
            return lambda s, i: i == 0 or s[i - 1] == "\n"
        return lambda s, i: i == 0
    builder.looks_ahead = True
    if code is sre.AT_END_STRING:
        return lambda s, i: i == len(s)
    if code is sre.AT_END:
        if multiline:
            return lambda s, i: i == len(s) or s[i] == "\n"
        return lambda s, i: i == len(s) or (i == len(s) - 1 and s[i] == "\n")
    word = re.compile(r"\w", flags & (sre.SRE_FLAG_ASCII | sre.SRE_FLAG_UNICODE))

    def boundary(s: str, i: int) -> bool:
        before = i > 0 and word.match(s[i - 1]) is not None
        after = i < len(s) and word.match(s[i]) is not None
        return before != after

    if code is sre.AT_BOUNDARY:
        return boundary
    return lambda s, i: s != "" and not boundary(s, i)  # re: \B never matches in ""


def _lookaround(av: tuple, negate: bool, flags: int, depth: int) -> Assertion:
    direction, body = av
    sub = _Builder()
    sub.sequence(body, flags, depth + 1)
    sub.emit(_MATCH)
    program = _Program(sub)
    if direction == 1:
        return lambda s, i: program.run(s, i, None) != negate
    # re.compile has checked that a look-behind has one width.
    width = sre_parse.SubPattern(sre_parse.State(), body).getwidth()[0]
    return lambda s, i: (i >= width and program.run(s, i - width, i)) != negate


class _Program:
    """A compiled automaton; :meth:`run` says whether it matches from a position."""

    def __init__(self, builder: _Builder) -> None:
        self.code: list[tuple[Any, Any, Any]] = [
            (op, a, b) for op, a, b in builder.code]
        self.cacheable = not builder.lookaround
        self.looks_ahead = builder.looks_ahead
        self.states: dict[frozenset[int], int] = {}
        self.sets: list[frozenset[int]] = []
        self.steps: dict[tuple, int] = {}
        self.held = 0  # program counters held in cached states

    def closure(self, pcs: list[int], s: str, i: int) -> frozenset[int]:
        seen: set[int] = set()
        stack = list(reversed(pcs))
        code = self.code
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            op, a, b = code[pc]
            if op is _SPLIT:
                stack += (b, a)
            elif op is _JMP:
                stack.append(a)
            elif op is _ASSERT and a(s, i):
                stack.append(pc + 1)
        budget = _BUDGET.get()
        if budget is not None:
            budget[0] -= len(seen)
            if budget[0] < 0:
                raise RegexRefused(f"matching it against the module names took more than "
                                   f"{budget[1]} automaton steps")
        return frozenset(pc for pc in seen if code[pc][0] in (_CHAR, _MATCH))

    def state_id(self, pcs: frozenset[int]) -> int:
        sid = self.states.get(pcs)
        if sid is None:
            self.held += len(pcs) + 1
            if self.held > _MAX_HELD:  # bound the cache's memory (not the work)
                self.states, self.sets, self.steps, self.held = {}, [], {}, len(pcs) + 1
            sid = self.states[pcs] = len(self.sets)
            self.sets.append(pcs)
        return sid

    def advance(self, sid: int, s: str, i: int) -> int:
        """The state after reading ``s[i]`` in state ``sid``."""
        ch = s[i]
        key: tuple = (sid, ch)
        if self.looks_ahead:
            key = (sid, ch, s[i + 1] if i + 1 < len(s) else None, i + 2 == len(s))
        if self.cacheable:
            nxt = self.steps.get(key)
            if nxt is not None:
                return nxt
        moved = [pc + 1 for pc in self.sets[sid]
                 if self.code[pc][0] is _CHAR and self.code[pc][1](ch)]
        nxt = self.state_id(self.closure(moved, s, i + 1))
        if self.cacheable:
            self.steps[key] = nxt
        return nxt

    def run(self, s: str, start: int, end: int | None) -> bool:
        """Whether the pattern matches ``s`` from ``start`` to ``end`` (any end if None)."""
        match = len(self.code) - 1
        sid = self.state_id(self.closure([0], s, start))
        for i in range(start, len(s) if end is None else end):
            pcs = self.sets[sid]
            if end is None and match in pcs:
                return True
            if not pcs:
                return False
            sid = self.advance(sid, s, i)
        return match in self.sets[sid]


class BoundedPattern:
    """A regex compiled for bounded-time matching, with ``re``'s meaning.

    Raises:
        RegexRefused: the pattern is invalid for ``re``, longer than :data:`MAX_LENGTH`,
            compiles to more than :data:`MAX_PROGRAM` states, nests deeper than
            :data:`MAX_DEPTH`, or uses backreferences, conditional or atomic groups or
            possessive quantifiers.
    """

    def __init__(self, pattern: str, *, label: str | None = None) -> None:
        self.label = pattern if label is None else label  # the pattern as the user wrote it
        if len(pattern) > MAX_LENGTH:
            raise RegexRefused(f"it is {len(pattern)} characters long; at most {MAX_LENGTH}")
        try:
            re.compile(pattern)  # re's own verdict on the syntax; compiling matches nothing
            parsed = sre_parse.parse(pattern)
        except re.error as err:
            raise RegexRefused(str(err), invalid=True) from None
        except (RecursionError, OverflowError, ValueError) as err:
            raise RegexRefused(f"it cannot be parsed ({type(err).__name__})") from None
        builder = _Builder()
        builder.sequence(parsed.data, parsed.state.flags, 0)
        builder.emit(_MATCH)
        self._program = _Program(builder)

    def match(self, name: str) -> bool:
        """``re.match(pattern, name) is not None``."""
        return self._run(name, None)

    def fullmatch(self, name: str) -> bool:
        """``re.fullmatch(pattern, name) is not None``."""
        return self._run(name, len(name))

    def _run(self, name: str, end: int | None) -> bool:
        try:
            return self._program.run(name, 0, end)
        except RegexRefused as err:  # past the work limit: say which pattern
            raise RegexRefused(f"{self.label!r}: {err}") from None
