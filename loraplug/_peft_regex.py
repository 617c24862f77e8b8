"""PEFT's two regex rules for module names, in bounded time.

``target_modules`` / ``exclude_modules`` as a string: ``re.fullmatch(pattern, name)``.
``rank_pattern`` / ``alpha_pattern``: the first key for which
``re.match(rf"(.*\\.)?({key})$", name)`` matches. Literal patterns (what
``save_adapter`` writes: escaped names, ``^`` anchors, alternations) are matched as
strings, whatever their length; any other pattern runs on :class:`~._regex.BoundedPattern`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ._regex import BoundedPattern

_SPECIAL = frozenset(".^$*+?{}[]()|\\")


def _literal_alternatives(pattern: str) -> list[tuple[bool, str]] | None:
    """``[(anchored, text), ...]`` when ``pattern`` is ``[^]literal|[^]literal...``."""
    found: list[tuple[bool, str]] = []
    anchored, text, i = False, [], 0
    if pattern.startswith("^"):
        anchored, i = True, 1
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if i + 1 == len(pattern) or (pattern[i + 1].isascii() and pattern[i + 1].isalnum()):
                return None  # a class such as \d, or an escape such as \n
            text.append(pattern[i + 1])
            i += 2
            continue
        if ch == "|":
            found.append((anchored, "".join(text)))
            anchored, text = pattern.startswith("^", i + 1), []
            i += 2 if anchored else 1
            continue
        if ch in _SPECIAL:
            return None
        text.append(ch)
        i += 1
    found.append((anchored, "".join(text)))
    return found


def _ends(name: str) -> list[str]:
    # "$" matches at the end and before a final newline.
    return [name, name[:-1]] if name.endswith("\n") else [name]


@functools.lru_cache(maxsize=512)
def fullmatcher(pattern: str) -> Callable[[str], bool]:
    """``name -> re.fullmatch(pattern, name) is not None``, in bounded time.

    Raises:
        RegexRefused: see :class:`~._regex.BoundedPattern`.
    """
    literal = _literal_alternatives(pattern)
    if literal is not None:
        return frozenset(text for _, text in literal).__contains__
    return BoundedPattern(pattern).fullmatch


@functools.lru_cache(maxsize=64)
def key_finder(keys: tuple[str, ...]) -> Callable[[str], int | None]:
    """``name ->`` the index of the first key for which
    ``re.match(rf"(.*\\.)?({key})$", name)`` matches, or ``None``: how PEFT resolves
    ``rank_pattern`` and ``alpha_pattern``. Literal keys are looked up by name and dotted
    suffix, so many keys cost no more than one; others run in bounded time.

    Raises:
        RegexRefused: a key is refused by :class:`BoundedPattern` once embedded (so
            ``"(?i)0"``, whose global flags end up not at the start, is refused).
    """
    exact: dict[str, int] = {}  # the whole name (an anchored key, or no prefix)
    suffix: dict[str, int] = {}  # what follows a dot (an unanchored key)
    general: list[tuple[int, Callable[[str], bool]]] = []
    for index, key in enumerate(keys):
        literal = _literal_alternatives(key)
        if literal is None:
            general.append((index, BoundedPattern(rf"(.*\.)?({key})$", label=key).match))
            continue
        for anchored, text in literal:
            exact.setdefault(text, index)
            if not anchored:
                suffix.setdefault(text, index)

    def find(name: str) -> int | None:
        hits = []
        for body in _ends(name):
            hits.append(exact.get(body))
            # "(.*\.)?" before the key: text without a newline, then a dot.
            newline = body.find("\n")
            hits += [suffix.get(body[at + 1:]) for at, ch in enumerate(body)
                     if ch == "." and (newline < 0 or at < newline)]
        best = min((hit for hit in hits if hit is not None), default=None)
        for index, match in general:
            if best is not None and index > best:
                break
            if match(name):
                return index
        return best

    return find
