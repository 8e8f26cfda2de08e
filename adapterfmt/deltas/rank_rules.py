"""Which rank a rule keeps, from a module's singular values (BEHAVIOUR §9.1).

Four rules, each given as a :class:`RankRule`:

* ``rank N`` — ``min(N, r)``.
* ``energy F`` — the smallest k whose singular values hold at least the fraction F of the
  delta's energy ``‖Δ‖²_F = ΣSᵢ²``. kohya's ``sv_fro`` with parameter p keeps Frobenius *norm*
  p, which is ``energy p²``.
* ``ratio R`` — every singular value at least ``S₀ / R`` (kohya's ``sv_ratio``).
* ``cumulative C`` — the smallest k whose singular values hold at least the fraction C of ``ΣSᵢ``
  (kohya's ``sv_cumulative``).

kohya's ``resize_lora.py`` adds one to each dynamic result and never goes below rank 2, so it
keeps one singular value more than its own rule says; here the rule is the rank (at least 1).
A zero delta keeps rank 1. No torch at import: the values are any float sequence or a tensor.
One implementation for every command that picks ranks: ``resize`` and ``combine``
(:mod:`adapterfmt.algebra`) and ``extract`` (:mod:`adapterfmt.extraction`, whose randomized SVD
knows only the leading singular values and passes the delta's whole energy as ``total``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import InvalidConfigError

RULES = ("rank", "energy", "ratio", "cumulative")


@dataclass(frozen=True)
class RankRule:
    """A rule and its parameter: ``RankRule("energy", 0.99)``. Use :func:`make_rule` to validate."""

    kind: str
    value: float

    def describe(self) -> str:
        return f"--{self.kind} {int(self.value) if self.kind == 'rank' else self.value:g}"

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.kind, "value": int(self.value) if self.kind == "rank" else self.value}


def make_rule(kind: str, value: float) -> RankRule:
    """A validated :class:`RankRule`.

    Raises:
        InvalidConfigError: an unknown rule, a rank below 1 or not whole, an energy or cumulative
            fraction outside (0, 1], a ratio below 1.
    """
    if kind not in RULES:
        raise InvalidConfigError(f"unknown rank rule {kind!r}", key=kind, hint=f"use one of {', '.join(RULES)}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidConfigError(f"--{kind} must be a finite number, got {value!r}", key=kind)
    if kind == "rank" and (v < 1 or v != int(v)):
        raise InvalidConfigError(f"--rank must be a whole number of at least 1, got {value!r}", key=kind)
    if kind in ("energy", "cumulative") and not 0 < v <= 1:
        raise InvalidConfigError(f"--{kind} must be in (0, 1], got {value!r}", key=kind, hint="a fraction: 0.99 keeps 99%")
    if kind == "ratio" and v < 1:
        raise InvalidConfigError(f"--ratio must be at least 1, got {value!r}", key=kind, hint="keeps singular values ≥ S₀/R")
    return RankRule(kind, v)


def _floats(singular_values: Any) -> list[float]:
    if hasattr(singular_values, "tolist"):
        singular_values = singular_values.tolist()
    return [float(s) for s in singular_values]


def kept_rank(singular_values: "Sequence[float] | Any", rule: RankRule, *, total: "float | None" = None, rtol: float = 1e-12) -> int:
    """The rank ``rule`` keeps for a delta with these singular values (descending), at least 1
    and at most ``len(singular_values)``.

    ``total``: for ``energy``, the delta's whole ``‖Δ‖²_F`` when the values are only its leading
    ones (a randomized SVD); when even all of them fall short, all are kept. ``rtol``: a sum that
    reaches the target up to this relative rounding counts as reaching it (the values' own
    precision: float32 singular values need about 4 float32 epsilons).
    """
    s = _floats(singular_values)
    r = len(s)
    if r == 0:
        return 0
    if rule.kind == "rank":
        return max(1, min(int(rule.value), r))
    if s[0] <= 0:
        return 1  # a zero delta: nothing to keep, one (zero) rank so the module still exists
    if rule.kind == "ratio":
        floor = s[0] / rule.value
        return max(1, sum(1 for x in s if x >= floor))
    values = [x * x for x in s] if rule.kind == "energy" else s
    if total is None or rule.kind != "energy":
        total = math.fsum(values)
    acc = 0.0
    for k, x in enumerate(values, start=1):
        acc += x
        if acc >= rule.value * total * (1 - rtol):  # the last one always qualifies despite rounding
            return k
    return r
