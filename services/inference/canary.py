"""Weighted aliases (canary, A/B): which version of a split alias answers a request.

The registry may point an alias at several versions with whole-percent weights (``production:
4=90, 5=10``). Each request draws a version by weight; a request that carries a routing key
(the OIP request parameter ``maas-routing-key``, or the gRPC metadata key of the same name)
always lands on the same version while the split stays the same: the key's sha256 picks the
point on the 100-wide wheel, so the same key is sticky across requests and across servers.

Splits are learned from the registry when an alias is first resolved, and learned from it
again on each alias-set event of ``maas.models.v1`` (the event says which alias moved; the
registry says where); a rollback is an alias move like any other.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from maas.errors import InvalidArgument
from maas.registry.types import AliasTargets

ROUTING_KEY = "maas-routing-key"
Key = tuple[str, str]  # (model name, alias)


def pick(targets: AliasTargets, routing_key: str, rng: random.Random) -> int:
    """The version a request goes to: by its key's hash when it has one, else at random."""
    total = sum(w for _, w in targets)
    if routing_key:
        digest = hashlib.sha256(routing_key.encode()).digest()
        point = int.from_bytes(digest[:8], "big") % total
    else:
        point = rng.randrange(total)
    for version, weight in targets:
        if point < weight:
            return version
        point -= weight
    raise AssertionError("weights exhausted before the point")  # sums make this unreachable


class SplitSource(Protocol):
    async def split(self, name: str, alias: str) -> AliasTargets: ...


async def split_of(source: object, name: str, alias: str) -> AliasTargets:
    """The split a source knows for ``name@alias`` (a bare name: production's); () for a
    source without weights."""
    if not hasattr(source, "split"):
        return ()
    targets: AliasTargets = await source.split(name, alias)
    return targets if len(targets) > 1 else ()


class Splits:
    """The weighted aliases of this server, and the draw for requests without a key."""

    def __init__(self, seed: int | None = None) -> None:
        self._splits: dict[Key, AliasTargets] = {}
        self._rng = random.Random(seed)

    def set(self, key: Key, targets: AliasTargets) -> None:
        if len(targets) > 1:
            self._splits[key] = targets
        else:
            self._splits.pop(key, None)

    def weighted(self, key: Key) -> bool:
        return key in self._splits

    def pick(self, key: Key, fallback: int, routing_key: str = "") -> int:
        """The version of ``key`` a request gets; ``fallback`` when the alias is not split."""
        targets = self._splits.get(key)
        return fallback if targets is None else pick(targets, routing_key, self._rng)

    def versions(self, key: Key) -> Sequence[int]:
        return [v for v, _ in self._splits.get(key, ())]


def routing_key(parameters: Mapping[str, Any], metadata: Iterable[tuple[str, Any]] | None) -> str:
    """A request's routing key: the OIP parameter ``maas-routing-key`` (a string, or a whole
    number as its decimal text: tritonclient sends Python ints as int64), else the gRPC metadata
    entry of that name; "" when it has neither."""
    param = parameters.get(ROUTING_KEY)
    if param is not None:
        kind = param.WhichOneof("parameter_choice")
        if kind == "string_param":
            return str(param.string_param)
        if kind in ("int64_param", "uint64_param"):
            return str(getattr(param, kind))
        raise InvalidArgument(
            f"parameter {ROUTING_KEY} is a {kind}; send it as a string or a whole number"
        )
    for key, value in metadata or ():
        if key == ROUTING_KEY:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return ""
