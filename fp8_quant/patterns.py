"""Layer-name regexes (``re:<expr>`` skip patterns) matched in time linear in the name, whatever the expression.

A skip pattern comes from a workflow someone shared or a command line someone pasted; Python's ``re`` backtracks,
so ``(.|.|.|.)*Z`` takes exponential time, and in ComfyUI the search holds the interpreter lock: one widget value
would freeze the whole server. So an expression is parsed with ``re``'s own parser (the same syntax and errors as
``re``) and run as a Thompson NFA (every state advanced together, one character at a time): each search costs at
most (name length + 1) x (states), never more. What needs backtracking to mean anything is refused by name:
backreferences, lookarounds, conditionals, atomic groups and possessive repeats. The expression's size is bounded
(``MAX_PATTERN_CHARS``, ``MAX_STATES``, counted repeats expanded), so compiling is bounded too.

Only whether the expression matches somewhere in the name is answered (``re.search(...) is not None``), which is
all a skip pattern needs; flags ``i``, ``s``, ``m``, ``a`` (inline, scoped or global) are honoured.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

try:  # Python 3.11+
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000
MAX_STATES = 4000  # after counted repeats are expanded: x{1000} alone would be 1000 states

Predicate = Callable[[str], bool]

_REFUSED = {
    "GROUPREF": "backreferences",
    "GROUPREF_EXISTS": "conditional groups",
    "ASSERT": "lookahead/lookbehind assertions",
    "ASSERT_NOT": "lookahead/lookbehind assertions",
    "ATOMIC_GROUP": "atomic groups",
    "POSSESSIVE_REPEAT": "possessive repeats",
}


class PatternError(ValueError):
    """An expression that is not valid, or that needs backtracking (its message says which part)."""


@dataclass
class _State:
    """One NFA state: ``char`` consumes a character it accepts, ``split`` forks, ``test`` checks the position."""

    kind: str  # "char" | "split" | "test" | "match"
    accepts: Predicate | None = None
    position: Callable[[str, int], bool] | None = None
    out: tuple[int, ...] = ()


class LinearRegex:
    """A compiled ``re:`` expression; ``search(name)`` says whether it matches anywhere in ``name``."""

    def __init__(self, expression: str) -> None:
        if len(expression) > MAX_PATTERN_CHARS:
            raise PatternError(f"longer than {MAX_PATTERN_CHARS} characters")
        try:
            parsed = _sre_parse.parse(expression)
        except re.error as error:
            raise PatternError(str(error)) from None
        except RecursionError:
            raise PatternError("groups nested too deeply") from None
        self.states: list[_State] = [_State("match")]
        self.copies = 0  # repeat copies built: bounds the work of empty bodies repeated (``((?:){99}){99}``) too
        try:
            self.start = self._build(list(parsed), parsed.state.flags, 0)
        except RecursionError:
            raise PatternError("groups nested too deeply") from None

    def search(self, text: str) -> bool:
        start, states = self.start, self.states
        current = self._closure([start], text, 0)
        for position, char in enumerate(text):
            if 0 in current:
                return True
            advanced = [states[s].out[0] for s in current if states[s].kind == "char" and states[s].accepts(char)]
            advanced.append(start)  # unanchored: a match may also begin at the next character
            current = self._closure(advanced, text, position + 1)
        return 0 in current

    def _closure(self, seeds: list[int], text: str, position: int) -> set[int]:
        """The states reachable from ``seeds`` without consuming a character; each state visited once."""
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            state = self.states[index]
            if state.kind == "split":
                stack.extend(state.out)
            elif state.kind == "test" and state.position(text, position):
                stack.append(state.out[0])
        return {index for index in seen if self.states[index].kind in ("char", "match")}

    # ---- construction: each item is built in front of the state that follows it -------------------------------

    def _add(self, state: _State) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"too large (over {MAX_STATES} states once repeats are counted out)")
        self.states.append(state)
        return len(self.states) - 1

    def _build(self, items: list, flags: int, following: int) -> int:
        for op, argument in reversed(items):
            following = self._item(str(op), argument, flags, following)
        return following

    def _item(self, op: str, argument, flags: int, following: int) -> int:
        if op in _REFUSED:
            raise PatternError(f"{_REFUSED[op]} are not supported in layer patterns (they need backtracking)")
        if op in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
            return self._add(_State("char", _char_predicate(op, argument, flags), out=(following,)))
        if op == "AT":
            return self._add(_State("test", position=_position_test(str(argument), flags), out=(following,)))
        if op == "SUBPATTERN":
            _group, add_flags, del_flags, body = argument
            return self._build(list(body), (flags | add_flags) & ~del_flags, following)
        if op == "BRANCH":
            starts = tuple(self._build(list(branch), flags, following) for branch in argument[1])
            return self._add(_State("split", out=starts))
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same set of matches
            low, high, body = argument
            return self._repeat(list(body), flags, low, high, following)
        raise PatternError(f"{op.lower()} is not supported in layer patterns")

    def _repeat(self, body: list, flags: int, low: int, high: int, following: int) -> int:
        unbounded = high == _sre.MAXREPEAT
        self.copies += 1 + low + (0 if unbounded else high - low)
        if self.copies > MAX_STATES:
            raise PatternError(f"too large (over {MAX_STATES} repeat copies once repeats are counted out)")
        if unbounded:  # body* in front of what follows: a loop through a fork
            loop = self._add(_State("split"))
            self.states[loop].out = (self._build(body, flags, loop), following)
            following = loop
        else:  # (high - low) optional copies
            for _ in range(high - low):
                following = self._add(_State("split", out=(self._build(body, flags, following), following)))
        for _ in range(low):
            following = self._build(body, flags, following)
        return following


@functools.lru_cache(maxsize=256)
def compile_regex(expression: str) -> LinearRegex:
    """The expression compiled once (nodes and the dispatcher match the same patterns against every layer)."""
    return LinearRegex(expression)


def _char_predicate(op: str, argument, flags: int) -> Predicate:
    ascii_only = bool(flags & re.ASCII)
    if op == "ANY":
        dotall = bool(flags & re.DOTALL)
        return lambda ch: dotall or ch != "\n"
    if op in ("LITERAL", "NOT_LITERAL"):
        wanted = chr(argument)
        accepts = _folded(lambda ch: ch == wanted, flags)
        return accepts if op == "LITERAL" else (lambda ch: not accepts(ch))
    members: list[Predicate] = []
    negate = False
    for member_op, value in argument:
        name = str(member_op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            members.append(functools.partial(str.__eq__, chr(value)))
        elif name == "NOT_LITERAL":
            members.append(functools.partial(str.__ne__, chr(value)))
        elif name == "RANGE":
            low, high = value
            members.append(lambda ch, low=low, high=high: low <= ord(ch) <= high)
        elif name == "CATEGORY":
            members.append(_category(str(value), ascii_only))
        else:
            raise PatternError(f"{name.lower()} in a character class is not supported in layer patterns")
    accepts = _folded(lambda ch: any(member(ch) for member in members), flags)
    return (lambda ch: not accepts(ch)) if negate else accepts


def _folded(accepts: Predicate, flags: int) -> Predicate:
    if not flags & re.IGNORECASE:
        return accepts
    return lambda ch: accepts(ch) or accepts(ch.lower()) or accepts(ch.upper())


def _is_word(ch: str, ascii_only: bool = False) -> bool:
    if ascii_only:
        return ch.isascii() and (ch.isalnum() or ch == "_")
    return ch.isalnum() or ch == "_"


def _category(name: str, ascii_only: bool) -> Predicate:
    digit = (lambda ch: "0" <= ch <= "9") if ascii_only else str.isdecimal
    space = (lambda ch: ch in " \t\n\r\f\v") if ascii_only else str.isspace
    tests: dict[str, Predicate] = {
        "CATEGORY_DIGIT": digit,
        "CATEGORY_NOT_DIGIT": lambda ch: not digit(ch),
        "CATEGORY_SPACE": space,
        "CATEGORY_NOT_SPACE": lambda ch: not space(ch),
        "CATEGORY_WORD": lambda ch: _is_word(ch, ascii_only),
        "CATEGORY_NOT_WORD": lambda ch: not _is_word(ch, ascii_only),
    }
    if name not in tests:
        raise PatternError(f"{name.lower()} is not supported in layer patterns")
    return tests[name]


def _position_test(name: str, flags: int) -> Callable[[str, int], bool]:
    multiline, ascii_only = bool(flags & re.MULTILINE), bool(flags & re.ASCII)

    def boundary(text: str, at: int) -> bool:
        before = at > 0 and _is_word(text[at - 1], ascii_only)
        after = at < len(text) and _is_word(text[at], ascii_only)
        return before != after

    tests: dict[str, Callable[[str, int], bool]] = {
        "AT_BEGINNING": lambda text, at: at == 0 or (multiline and text[at - 1] == "\n"),
        "AT_BEGINNING_STRING": lambda text, at: at == 0,
        "AT_END": lambda text, at: (
            at == len(text)
            or (at == len(text) - 1 and text[at] == "\n")
            or (multiline and text[at] == "\n")
        ),
        "AT_END_STRING": lambda text, at: at == len(text),
        "AT_BOUNDARY": boundary,
        "AT_NON_BOUNDARY": lambda text, at: not boundary(text, at),
    }
    if name not in tests:
        raise PatternError(f"{name.lower()} is not supported in layer patterns")
    return tests[name]
