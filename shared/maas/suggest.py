"""Suggestions ("did you mean ...?") for names a user mistyped: job keys, layer types, archs.

Suggestions come from the edit distance (insertions, deletions, substitutions and swaps of two
neighbouring letters), so ``momentm`` finds ``momentum`` and ``trainig`` finds ``training``.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_WORD_CHARS = 64


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: a swap of two neighbouring letters costs one edit."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(
                previous[j] + 1,  # delete ca
                current[j - 1] + 1,  # insert cb
                previous[j - 1] + (ca != cb),  # substitute
            )
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to ``word``, if it is near enough to be a typo of it."""
    if len(word) > MAX_WORD_CHARS:
        return None  # not a typo of any name we have, and costly to compare
    scored = sorted((edit_distance(word.lower(), c.lower()), c) for c in choices)
    # A third of the name may be wrong: 'hidn' is still 'hidden', 'lr' is not 'eps'.
    near = [c for distance, c in scored if distance <= max(1, len(c) // 3)]
    return near[0] if near else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` did you mean 'x'?`` or ``accepted: a, b, c``: the tail of an error about ``word``."""
    options = sorted(set(choices))
    guess = closest(word, options)
    if guess is not None:
        return f"did you mean {guess!r}?"
    return "accepted: " + (", ".join(options) if options else "none")


def unknown_key(path: str, known: Iterable[str]) -> str:
    """``training.optimizer.momentm: unknown key; did you mean 'momentum'?``"""
    key = path.rsplit(".", 1)[-1]
    return f"{path}: unknown key; {did_you_mean(key, known)}"
