"""Bearer tokens with roles: who may call which gRPC method.

A token is an opaque random string; servers keep only its sha256 in a token table, a JSON file::

    {"format": "maas.tokens/1",
     "tokens": [{"identity": "admin", "role": "write", "sha256": "<hex>"}, ...]}

Roles: ``read`` (infer, get, list, metadata), ``write`` (register, alias, delete, policies;
write implies read) and ``service`` (the platform's own processes: write, plus the training data
plane, whose gradient pushes only a gradient worker has any business sending). Which role a
method needs follows from its name (``required_role``); a method the rule does not know as a read
needs write, so a new RPC is never open by accident. Health and reflection stay open: probes and
tools carry no token.

``ensure_tokens`` writes the table plus one ``<identity>.token`` file per identity (mode 0600)
into a directory; ``maas stack up`` and the test stacks call it, compose's ``auth-init`` too.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas.config import Settings
from maas.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from maas.textfile import read_text_file

log = logging.getLogger(__name__)

TABLE_FORMAT = "maas.tokens/1"
TABLE_FILE = "tokens.json"
TOKEN_PREFIX = "maas_"  # makes a leaked token recognisable to secret scanners
_QUOTED_CREDENTIAL = re.compile(r"(?is)(authorization|bearer\s).*")
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# Method-name prefixes that only read: OIP's Server*/Model* calls, RepositoryIndex, Get*, List*.
READ_PREFIXES = ("Get", "List", "Server", "Model", "RepositoryIndex")
# Services between the platform's own processes: an operator's token has no use for them.
SERVICE_ONLY = frozenset({"maas.training.v1.TrainingDataPlane"})


class Role(enum.Enum):
    READ = "read"
    WRITE = "write"
    SERVICE = "service"

    def allows(self, needed: Role) -> bool:
        return _RANKS[self] >= _RANKS[needed]


_RANKS = {Role.READ: 0, Role.WRITE: 1, Role.SERVICE: 2}  # each role allows what those below do


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role


# Who a call runs as when MAAS_AUTH=off: nobody in particular, allowed everything.
ANONYMOUS = Identity("anonymous", Role.WRITE)

# What a stack generates: the operator (CLI), a read-only token to hand out, the services.
STACK_IDENTITIES: Mapping[str, Role] = {
    "admin": Role.WRITE,
    "reader": Role.READ,
    "services": Role.SERVICE,
    "inference": Role.READ,
}


def required_role(method: str) -> Role | None:
    """The role ``/package.Service/Method`` needs; None for the open services."""
    service, _, name = method.lstrip("/").partition("/")
    if service in OPEN_SERVICES:
        return None
    if service in SERVICE_ONLY:
        return Role.SERVICE
    return Role.READ if name.startswith(READ_PREFIXES) else Role.WRITE


def digest(token: str) -> str:
    # surrogateescape: an HTTP header's bytes that are not UTF-8 reach us as lone surrogates
    # (aiohttp decodes that way); they hash as the bytes sent, never raise.
    return hashlib.sha256(token.encode(errors="surrogateescape")).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry, if there is one. A call with
    several ``authorization`` entries is refused: which one counts would depend on their order
    (a proxy's added entry could be overridden by the client's)."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) > 1:
        raise Unauthenticated(
            f"the call has {len(values)} 'authorization' entries; send exactly one "
            "'authorization: Bearer <token>'"
        )
    for value in values:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class TokenTable:
    """sha256(token) -> identity, loaded from a token table file."""

    def __init__(self, identities: Mapping[str, Identity]) -> None:
        self._by_digest = dict(identities)

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise FailedPrecondition(
                f"auth is on (MAAS_AUTH) but the token table {path} does not exist; "
                "`maas stack up` creates one, or point MAAS_AUTH_TOKENS_FILE at yours "
                "(MAAS_AUTH=off disables auth)"
            ) from None
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"token table {path} is not readable JSON: {exc}") from None
        return cls.parse(doc, str(path))

    @classmethod
    def parse(cls, doc: Any, where: str) -> TokenTable:
        if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
            raise InvalidArgument(f"{where}: expected a JSON object with format {TABLE_FORMAT!r}")
        entries = doc.get("tokens")
        if not isinstance(entries, list):
            raise InvalidArgument(f"{where}: 'tokens' must be a list")
        identities: dict[str, Identity] = {}
        for i, entry in enumerate(entries):
            identity = _entry(entry, f"{where}: tokens[{i}]")
            identities[str(entry["sha256"]).lower()] = identity
        return cls(identities)

    def identify(self, metadata: Iterable[tuple[str, Any]] | None) -> Identity:
        """The caller's identity; Unauthenticated without a known bearer token."""
        token = bearer_token(metadata)
        identity = self._by_digest.get(digest(token)) if token else None
        if identity is None:
            raise Unauthenticated(
                "this API needs 'authorization: Bearer <token>' (gRPC metadata or HTTP header); "
                "the call had "
                + ("an unknown token" if token else "no bearer token")
                + " (the maas CLI sends MAAS_AUTH_TOKEN or the file MAAS_AUTH_TOKEN_FILE)"
            )
        return identity


def _entry(entry: Any, where: str) -> Identity:
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where} must be an object with identity, role and sha256")
    name, role, sha = entry.get("identity"), entry.get("role"), entry.get("sha256")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{where}.identity must be a non-empty string")
    if role not in {r.value for r in Role}:
        raise InvalidArgument(
            f"{where}.role is {role!r}; use one of " + ", ".join(repr(r.value) for r in Role)
        )
    if not isinstance(sha, str) or len(sha) != 64:
        raise InvalidArgument(f"{where}.sha256 must be 64 hex digits")
    return Identity(name, Role(role))


@dataclass(frozen=True)
class Authorizer:
    """The server's policy: a token table, or ``None`` when MAAS_AUTH=off."""

    table: TokenTable | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authorizer:
        if not settings.auth:
            log.warning("MAAS_AUTH=off: every gRPC method is open to anyone who reaches the port")
            return cls(None)
        return cls(TokenTable.load(tokens_file(settings)))

    def authorize(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Identity:
        """The identity a call runs as; Unauthenticated or PermissionDenied if it may not."""
        needed = required_role(method)
        if needed is None or self.table is None:
            return ANONYMOUS
        identity = self.table.identify(metadata)
        if not identity.role.allows(needed):
            raise PermissionDenied(
                f"{identity.name!r} has role {identity.role.value}; "
                f"{method.rsplit('/', 1)[-1]} needs {needed.value}"
            )
        return identity


# --- where tokens live ---------------------------------------------------------------------------


def auth_dir(settings: Settings) -> Path:
    return settings.state_path / "auth"


def tokens_file(settings: Settings) -> Path:
    return (
        Path(settings.auth_tokens_file)
        if settings.auth_tokens_file
        else auth_dir(settings) / TABLE_FILE
    )


def token_file(settings: Settings) -> Path:
    if settings.auth_token_file:
        return Path(settings.auth_token_file)
    return auth_dir(settings) / "admin.token"


def client_token(settings: Settings) -> str | None:
    """The token this process sends: MAAS_AUTH_TOKEN, else the token file if it exists."""
    if settings.auth_token:
        return settings.auth_token
    path = token_file(settings)
    if not path.exists():
        if settings.auth_token_file:
            raise FailedPrecondition(
                f"MAAS_AUTH_TOKEN_FILE={path} does not exist; `maas stack up` writes tokens "
                f"to {auth_dir(settings)}"
            )
        return None
    return read_text_file(path, "token file").strip() or None


def ensure_tokens(directory: Path, identities: Mapping[str, Role]) -> Path:
    """The token table in ``directory`` with a token for each identity (kept if present).

    New tokens go to ``<identity>.token`` (0600) and their sha256 into ``tokens.json``. An
    identity already there keeps its token and takes the role asked for here: a table written
    by an older version (where ``services`` had ``write``) is brought up to date. Returns the
    table's path."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    table = directory / TABLE_FILE
    doc: dict[str, Any] = (
        json.loads(table.read_text()) if table.exists() else {"format": TABLE_FORMAT, "tokens": []}
    )
    TokenTable.parse(doc, str(table))  # refuse to extend a broken table
    known = {entry["identity"]: entry for entry in doc["tokens"]}
    for name, role in identities.items():
        if name in known:
            _settle_role(known[name], role, table)
            continue
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        _write_private(directory / f"{name}.token", token + "\n")
        doc["tokens"].append({"identity": name, "role": role.value, "sha256": digest(token)})
    _write_private(table, json.dumps(doc, indent=2) + "\n")
    return table


def _settle_role(entry: dict[str, Any], role: Role, table: Path) -> None:
    if entry["role"] != role.value:
        log.info(
            "%s: identity %r had role %s; it now has %s (its token is kept)",
            table,
            entry["identity"],
            entry["role"],
            role.value,
        )
        entry["role"] = role.value


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def redact_credentials(text: str) -> str:
    """``text`` cut where it starts quoting a credential (an ``Authorization`` header, a
    ``Bearer`` token). An HTTP parser's refusal quotes the raw header bytes it choked on, and
    where the header spans lines, or its bytes are escaped, the token is no longer the word
    after ``Bearer``: everything from there on is withheld."""
    return _QUOTED_CREDENTIAL.sub(r"\1 [withheld]", text)
