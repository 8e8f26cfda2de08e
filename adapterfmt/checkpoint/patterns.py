"""Regular expressions from untrusted configs, matched with bounded work (docs/BEHAVIOUR.md §1).

``target_modules`` / ``exclude_modules`` strings, ``rank_pattern`` / ``alpha_pattern`` keys,
``layers_pattern`` entries and ``modules_to_save`` entries are regexes written by whoever made
the adapter. Python's ``re`` backtracks: ``(a+)+b`` takes exponential time and ``.*.*.*.*x``
polynomial time of high degree, and a match cannot be interrupted. So each pattern is vetted
before it is compiled, and each match is priced before it runs:

1. **Static rules** (refused at config time, one line naming the field): no backreferences or
   conditional groups; no repetition inside a repetition (``(a+)+``, ``(\\w+\\.)*``, ``(a?){9}``);
   no alternation inside a repetition whose branches can start with the same character
   (``(a|ab)*``). These are exactly the constructs that make backtracking exponential.
2. **A price per name**: what remains backtracks at most polynomially. The number of steps is
   bounded by ``(len(name) + size) × Π factor`` with one factor per repetition (how many places
   the text after it can start: occurrences of its first characters in the name, or the name's
   length) and per ambiguous alternation. A name whose price exceeds :data:`MAX_STEPS` is
   refused before ``re`` runs, naming the pattern and the module.
3. **A bound on the total**: a pattern whose matches have taken more than :data:`MAX_SECONDS`
   in one process is refused, so many names of maximal price cannot add up to a hang either.

Every pattern that passes is matched by Python's ``re`` itself, so results are PEFT's exactly.
Compiled patterns are cached: each is compiled once per process.
"""

from __future__ import annotations

import re
import time
from typing import Iterable, Optional

from ..errors import InvalidConfigError

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.9 / 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: Most backtracking steps one match may be priced at (≈ 0.05 s of ``re`` at worst).
MAX_STEPS = 10_000_000
#: Most seconds all matches of one pattern may take in one process.
MAX_SECONDS = 10.0

_HINT = "simplify it (no nested or repeated wildcards); PEFT would backtrack on it too"
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | ({_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set())
_ATOMIC = getattr(_c, "ATOMIC_GROUP", None)
_END = ""  #: in a first-character set: the end of the pattern
_ALL = None  #: a first-character set too large to count (any character)
_SMALL_RANGE = 16


class _Unsafe(Exception):
    pass


class _Analysis:
    """What pricing a match needs: a tree of path counts (``seq`` multiplies, ``alt`` adds) and the size."""

    def __init__(self) -> None:
        self.tree: tuple = ("const", 1)
        self.size = 0
        self.loops = 0


def _union(a: Optional[frozenset[str]], b: Optional[frozenset[str]]) -> Optional[frozenset[str]]:
    return None if a is None or b is None else a | b


def _in_set(items: list) -> Optional[frozenset[str]]:
    chars: set[str] = set()
    for op, av in items:
        if op is _c.LITERAL:
            chars.add(chr(av))
        elif op is _c.RANGE and av[1] - av[0] <= _SMALL_RANGE:
            chars.update(chr(i) for i in range(av[0], av[1] + 1))
        else:  # NEGATE, CATEGORY, a wide range: too many characters to count
            return _ALL
    return frozenset(chars)


def _first(seq: Iterable, follow: Optional[frozenset[str]]) -> Optional[frozenset[str]]:
    """Characters a match of ``seq`` followed by ``follow`` can start with (a superset)."""
    f = follow
    for op, av in reversed(list(seq)):
        if op is _c.LITERAL:
            f = frozenset(chr(av))
        elif op is _c.IN:
            f = _in_set(av)
        elif op is _c.BRANCH:
            out: Optional[frozenset[str]] = frozenset()
            for alt in av[1]:
                out = _union(out, _first(alt, f))
            f = out
        elif op is _c.SUBPATTERN:
            f = _first(av[-1], f)
        elif op is _ATOMIC:
            f = _first(av, f)
        elif op in _REPEATS:
            body = _first(av[2], f)
            f = _union(body, f) if av[0] == 0 else body
        elif op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            pass  # zero width: the next character comes from what follows
        else:  # ANY, NOT_LITERAL, CATEGORY, ...
            f = _ALL
    return f


def _walk(seq: list, follow: Optional[frozenset[str]], in_loop: bool, out: _Analysis) -> tuple:
    """Vet ``seq`` (raise :class:`_Unsafe`) and return its path-count tree.

    ``("seq", parts)``: product; ``("alt", parts)``: sum; ``("loop", follow, max)``: one path per
    place the text after the loop can start; ``("const", k)``.
    """
    items = list(seq)
    follows = [follow] * len(items)
    for i in range(len(items) - 2, -1, -1):
        follows[i] = _first(items[i + 1 : i + 2], follows[i + 1])
    parts: list[tuple] = []
    for (op, av), after in zip(items, follows):
        out.size += 1
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS) or op is getattr(_c, "GROUPREF_IGNORE", object()):
            raise _Unsafe("uses a backreference or a conditional group")
        if op in _REPEATS:
            lo, hi, body = av
            inner = _walk(body, _union(_first(body, after), after), in_loop or hi > 1, out)
            if hi > 1 or lo != hi:
                if in_loop:
                    raise _Unsafe("repeats a repetition (nested quantifiers like (a+)+ backtrack exponentially)")
                if hi > 1:
                    out.loops += 1
                    parts.append(("loop", after, float("inf") if hi == _c.MAXREPEAT else float(hi)))
                else:
                    parts.append(("alt", [("const", 1), inner]))
            else:
                parts.append(inner)
        elif op is _c.BRANCH:
            alts = av[1]
            firsts = [_first(alt, frozenset({_END})) for alt in alts]
            if in_loop:
                seen: set[str] = set()
                for f in firsts:
                    if f is _ALL or _END in f or seen & f:
                        raise _Unsafe("repeats an alternation whose branches can start with the same character")
                    seen |= f
            trees = [_walk(alt, after, in_loop, out) for alt in alts]
            if all(t == ("seq", []) for t in trees) and not any(f is _ALL for f in firsts):
                # no choice inside any branch: at one position only branches sharing its character go on
                counts: dict[str, int] = {}
                for f in firsts:
                    for ch in f:  # type: ignore[union-attr]
                        counts[ch] = counts.get(ch, 0) + 1
                parts.append(("const", max(counts.values(), default=1)))
            else:
                parts.append(("alt", trees))
        elif op is _c.SUBPATTERN:
            parts.append(_walk(av[-1], after, in_loop, out))
        elif op is _ATOMIC:
            parts.append(_walk(av, after, in_loop, out))
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            parts.append(("alt", [("const", 1), _walk(av[1], frozenset({_END}), in_loop, out)]))
    parts = [p for p in parts if p != ("seq", []) and p != ("const", 1)]
    return ("seq", parts)


def _paths(node: tuple, name: str, crude: bool) -> float:
    kind = node[0]
    if kind == "seq":
        total = 1.0
        for part in node[1]:
            total *= _paths(part, name, crude)
        return total
    if kind == "alt":
        return float(sum(_paths(part, name, crude) for part in node[1]))
    if kind == "loop":
        _, follow, hi = node
        n = len(name)
        if crude or follow is _ALL:
            places = n
        else:
            places = sum(name.count(ch) for ch in follow if ch) + (2 if _END in follow else 0)
        return min(hi, n, places) + 1.0
    return float(node[1])


class BoundedRegex:
    """One untrusted pattern inside a fixed template, compiled once, matched at a bounded price."""

    __slots__ = ("pattern", "field", "path", "regex", "_analysis", "_ignorecase", "_seconds")

    def __init__(self, pattern: str, template: str, field: str, path: Optional[str]) -> None:
        self.pattern, self.field, self.path = pattern, field, path
        source = template.replace("{}", pattern)
        try:
            self.regex = re.compile(source)
            parsed = _sre_parse.parse(source)
        except (re.error, RecursionError, OverflowError) as e:
            raise InvalidConfigError(f"is not a valid regular expression ({e})", path=path, key=field, hint="fix the pattern") from None
        self._analysis = _Analysis()
        try:
            self._analysis.tree = _walk(list(parsed), frozenset({_END}), False, self._analysis)
        except _Unsafe as e:
            raise InvalidConfigError(f"regex {pattern!r} {e}; refused", path=path, key=field, hint=_HINT) from None
        except RecursionError:
            raise InvalidConfigError(f"regex {pattern!r} is nested too deeply; refused", path=path, key=field, hint=_HINT) from None
        self._ignorecase = bool(parsed.state.flags & re.IGNORECASE)  # counts would miss the other case
        self._seconds = 0.0

    def price(self, name: str) -> float:
        """An upper bound on the backtracking steps of matching ``name``."""
        a = self._analysis
        per_path = len(name) + a.size
        crude = per_path * _paths(a.tree, name, True)
        if crude <= MAX_STEPS:
            return crude
        return per_path * _paths(a.tree, name, self._ignorecase)

    def _guard(self, name: str) -> None:
        if self._seconds > MAX_SECONDS:
            raise InvalidConfigError(
                f"regex {self.pattern!r} has taken more than {MAX_SECONDS:g} s of matching; refused",
                path=self.path,
                key=self.field,
                hint=_HINT,
            )
        steps = self.price(name)
        if steps > MAX_STEPS:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise InvalidConfigError(
                f"regex {self.pattern!r} could take about {steps:.1e} backtracking steps on module '{shown}' "
                f"(the bound is {MAX_STEPS:.0e}); refused",
                path=self.path,
                key=self.field,
                hint=_HINT,
            )

    def match(self, name: str) -> "Optional[re.Match[str]]":
        self._guard(name)
        start = time.perf_counter()
        try:
            return self.regex.match(name)
        finally:
            self._seconds += time.perf_counter() - start

    def fullmatch(self, name: str) -> "Optional[re.Match[str]]":
        self._guard(name)
        start = time.perf_counter()
        try:
            return self.regex.fullmatch(name)
        finally:
            self._seconds += time.perf_counter() - start


_CACHE: dict[tuple[str, str], BoundedRegex] = {}
_CACHE_SIZE = 65536


def bounded(pattern: str, template: str = "{}", field: Optional[str] = None, path: Optional[str] = None) -> BoundedRegex:
    """The compiled, vetted :class:`BoundedRegex` for ``template`` with ``{}`` replaced by ``pattern``.

    Compiled once per process. ``field`` and ``path`` label the error messages; the latest
    label given wins (the config reader gives them, matching code later reuses the object).

    Raises:
        InvalidConfigError: not a valid regex, or one of the static rules refuses it.
    """
    key = (pattern, template)
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        hit = _CACHE[key] = BoundedRegex(pattern, template, field or "pattern", path)
    elif field is not None:
        hit.field, hit.path = field, path if path is not None else hit.path
    return hit


#: PEFT's templates, one per place an untrusted pattern is used (docs/FORMAT.md §4.2, §5).
FULL = "{}"  #: target_modules / exclude_modules strings: ``re.fullmatch(pattern, name)``
PATTERN_KEY = r"(.*\.)?({})$"  #: rank_pattern / alpha_pattern keys: ``re.match``
LAYERS = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  #: layers_pattern entries: ``re.match``
MODULES_TO_SAVE = r"(^|.*\.){}($|\..*)"  #: modules_to_save entries keep LoRA out: ``re.match``


def literal_tail(pattern: str) -> str:
    """Literal text every match of ``pattern`` ends with, before an optional ``$`` ('' if unknown).

    Used to index many patterns by the end of the name: a name that does not end with a
    pattern's tail cannot match ``(.*\\.)?(pattern)$`` (names ending in a newline excepted,
    since ``$`` also matches before one).
    """
    try:
        parsed = _sre_parse.parse(pattern)
    except Exception:  # noqa: BLE001 - vetted elsewhere; no tail is always safe
        return ""
    if parsed.state.flags & re.IGNORECASE:
        return ""
    items = list(parsed)
    while items and items[-1][0] is _c.AT and items[-1][1] in (_c.AT_END, _c.AT_END_STRING):
        items.pop()
    tail = []
    for op, av in reversed(items):
        if op is not _c.LITERAL:
            break
        tail.append(chr(av))
    return "".join(reversed(tail))
