"""Per-subject permissions: which node may publish to and subscribe to which subjects.

Modelled on NATS account/user permissions. Every node that receives a message from a peer
checks the policy for the *sending* node (so a peer that ignores the policy cannot get through),
and every sender checks itself early so that the user gets :class:`mesh.errors.PermissionDenied`
at the call instead of a silent drop at the receivers. This module is pure: no sockets, no
threads, no I/O except reading the policy file in :meth:`Policy.load`.

Format
------
A policy is a dict (or a JSON or TOML file holding the same structure)::

    {
      "roles": {
        "worker": {"publish": ["grad.>"], "subscribe": ["params.>", "grad.>"]},
        "ps":     {"publish": {"allow": ["params.>"], "deny": ["params.secret.>"]},
                   "subscribe": ["grad.>"]},
        "admin":  {"publish": [">"], "subscribe": [">"]}
      },
      "nodes":   {"ps-*": ["ps"], "worker-*": ["worker"], "ops": ["admin"]},
      "default": []
    }

The same in TOML::

    default = []
    [roles.worker]
    publish = ["grad.>"]
    subscribe = ["params.>", "grad.>"]
    [roles.ps]
    publish = { allow = ["params.>"], deny = ["params.secret.>"] }
    subscribe = ["grad.>"]
    [nodes]
    "ps-*" = ["ps"]
    "worker-*" = ["worker"]

- ``roles`` maps a role name to its ``publish`` and ``subscribe`` permissions. Each is either a
  list of allowed subject patterns or ``{"allow": [...], "deny": [...]}`` (both optional). A
  role without ``publish`` (or ``subscribe``) allows nothing for it. Patterns follow
  :mod:`mesh.subjects`; patterns whose first token is ``_mesh`` are rejected (see below).
- ``nodes`` maps shell-style globs of node names (:func:`fnmatch.fnmatchcase`: ``*``, ``?``,
  ``[abc]``, case-sensitive) to lists of role names. A node gets the union of the roles of
  *every* entry its name matches. An entry with an empty list still counts as a match.
- ``default`` (optional) lists the roles of a node whose name matches no ``nodes`` entry.
  Without it such a node may do nothing.
- Every key is optional; ``{}`` is a valid policy that forbids all user traffic. Unknown keys,
  unknown role names, invalid patterns and wrong types raise :class:`mesh.errors.ConfigError`
  naming the place (``policy roles.worker.publish[1]: ...``) and the fix.

Rules
-----
- Publish: a node may publish to the (literal) subject ``s`` iff some allow pattern of one of its
  roles matches ``s`` and no deny pattern of *any* of its roles matches ``s``. As in NATS, the
  roles' allow and deny lists are merged and deny wins, so a deny in one role overrides an allow
  in another (a role can be used to take rights away).
- Subscribe: a node may subscribe to the pattern ``p`` iff ``p`` is *covered* by a single allow
  pattern (every subject ``p`` matches is matched by that allow pattern, see
  :func:`pattern_covers`) and ``p`` *intersects* no deny pattern (no subject matches both, see
  :func:`patterns_intersect`). So the subscription can never receive a forbidden subject, and
  the rule is decided once at subscribe time instead of per message. NATS instead accepts a
  wildcard subscription that overlaps a deny and filters the denied messages on delivery; here
  the subscriber has to subscribe to something narrower. A pattern covered only by the union of
  several allow patterns (``a.>`` by ``a.*`` plus ``a.*.>``) is rejected: subscribe to the
  pieces or allow the wider pattern.
- The mesh's own traffic, subjects and patterns whose first token is ``_mesh`` (membership,
  credits, collectives...), is always allowed: the nodes exchanging it already hold the cluster
  credential, which is what lets them into the mesh at all, and the mesh cannot work without
  it. Policies therefore may not mention ``_mesh`` patterns.

Queries accept any node name (a ``str``) and raise :class:`mesh.errors.InvalidSubject` for an
invalid subject or pattern. :meth:`Policy.may_publish` and :meth:`Policy.may_subscribe` cache
their answers per (node name, subject) in bounded dicts, since receivers check every message.
A :class:`Policy` never changes after construction; its queries may be called from several
threads (the caches are plain dicts: a race can at worst recompute an answer).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, overload

from mesh.errors import ConfigError, InvalidSubject, PermissionDenied
from mesh.subjects import RESERVED_PREFIX, SubjectTrie, validate_pattern, validate_subject

__all__ = ["DEFAULT_CACHE_SIZE", "Policy", "pattern_covers", "patterns_intersect"]

DEFAULT_CACHE_SIZE = 4096

_TOP_KEYS = ("roles", "nodes", "default")
_ROLE_KEYS = ("publish", "subscribe")
_PERM_KEYS = ("allow", "deny")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+").fullmatch
_MAX_LISTED = 8  # patterns quoted in a PermissionDenied message
# Bound of the name -> roles cache and of the compiled role sets; not tied to cache_size, so
# that disabling the answer caches does not recompile the roles on every check.
_NAME_CACHE_SIZE = 1024


# --------------------------------------------------------------------------- pattern algebra


def pattern_covers(general: str, specific: str) -> bool:
    """True if every subject matched by ``specific`` is matched by ``general``.

    Both are patterns and may hold ``*`` and ``>``. Reflexive and transitive; a literal
    ``specific`` is covered exactly when ``general`` matches it. Raises
    :class:`~mesh.errors.InvalidSubject` for an invalid pattern."""
    validate_pattern(general, allow_reserved=True)
    validate_pattern(specific, allow_reserved=True)
    return _covers(general.split("."), specific.split("."))


def patterns_intersect(a: str, b: str) -> bool:
    """True if some (literal) subject is matched by both patterns. Symmetric; implied by
    :func:`pattern_covers`. Raises :class:`~mesh.errors.InvalidSubject` for an invalid pattern."""
    validate_pattern(a, allow_reserved=True)
    validate_pattern(b, allow_reserved=True)
    return _intersect(a.split("."), b.split("."))


def _covers(g: Sequence[str], s: Sequence[str]) -> bool:
    for i, gt in enumerate(g):
        if gt == ">":
            # '>' takes one or more tokens: s must still have one here (any token, even '>').
            return len(s) > i
        if i >= len(s):
            return False
        st = s[i]
        # A '>' in s reaches subjects of every length, which no non-'>' token of g can;
        # a '*' in s takes any token, so only '*' covers it (tokens are an unbounded set).
        if st == ">" or (gt != "*" and gt != st):
            return False
    return len(g) == len(s)


def _intersect(a: Sequence[str], b: Sequence[str]) -> bool:
    for x, y in zip(a, b, strict=False):
        if x == ">" or y == ">":
            return True  # the other still has a token here, and any tail can be filled in
        if x != y and x != "*" and y != "*":
            return False
    # No '>' met: one pattern ended, so they share subjects only if both end together (a
    # trailing '>' in the longer one would need a token the shorter cannot give).
    return len(a) == len(b)


def _matches(pattern: Sequence[str], subject: Sequence[str]) -> bool:
    return _covers(pattern, subject)  # a literal subject is covered iff matched


def _is_reserved(s: str) -> bool:
    return s.startswith(RESERVED_PREFIX) or s == RESERVED_PREFIX[:-1]


# --------------------------------------------------------------------------- parsed policy


@dataclass(frozen=True)
class _Perm:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Role:
    publish: _Perm
    subscribe: _Perm


class _Compiled:
    """Merged permissions of one set of roles, in the shape the checks want."""

    __slots__ = ("pub_allow", "pub_deny", "roles", "sub_allow", "sub_deny")

    def __init__(self, roles: frozenset[str], defs: Mapping[str, _Role]) -> None:
        self.roles = roles
        # Our own per-(name, subject) cache sits in front, so the tries need none.
        self.pub_allow: SubjectTrie[str] = SubjectTrie(cache_size=0)
        self.pub_deny: SubjectTrie[str] = SubjectTrie(cache_size=0)
        sub_allow: dict[str, list[str]] = {}
        sub_deny: dict[str, list[str]] = {}
        for name in roles:
            role = defs[name]
            for p in role.publish.allow:
                self.pub_allow.insert(p, name)
            for p in role.publish.deny:
                self.pub_deny.insert(p, name)
            for p in role.subscribe.allow:
                sub_allow.setdefault(p, p.split("."))
            for p in role.subscribe.deny:
                sub_deny.setdefault(p, p.split("."))
        self.sub_allow = tuple(sub_allow.values())
        self.sub_deny = tuple(sub_deny.values())

    def publish_ok(self, subject: str) -> bool:
        return bool(self.pub_allow.match(subject)) and not self.pub_deny.match(subject)

    def subscribe_ok(self, pattern: str) -> bool:
        toks = pattern.split(".")
        return any(_covers(a, toks) for a in self.sub_allow) and not any(
            _intersect(d, toks) for d in self.sub_deny
        )


def _put(cache: dict, key: Any, value: Any, size: int) -> dict:
    """Store in a bounded cache; returns the dict to keep (a new one after an eviction)."""
    if not size:
        return cache
    if len(cache) >= size:
        # Drop the older half (FIFO: a hit must not pay for LRU bookkeeping). Copy first: a
        # C-level copy is atomic, iterating the live dict could race with another thread.
        snapshot = cache.copy()
        cache = dict(islice(snapshot.items(), len(snapshot) - size // 2, None))
    cache[key] = value
    return cache


def _where(*parts: str | int) -> str:
    """``roles.worker.publish[1]``; keys that are not plain words are quoted."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _PLAIN_KEY(p):
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class _Parser:
    """Checks a policy document and says precisely where it is wrong."""

    def __init__(self, source: str | None) -> None:
        self.suffix = f" in {source}" if source else ""

    def error(self, where: str, problem: str) -> ConfigError:
        at = f" {where}" if where else ""
        return ConfigError(f"policy{at}{self.suffix}: {problem}")

    def keys(self, doc: Mapping, path: tuple[str | int, ...], allowed: Sequence[str]) -> None:
        for key in doc:
            if not isinstance(key, str):
                raise self.error(_where(*path), f"keys must be strings, got {_show(key)}")
            if key not in allowed:
                names = ", ".join(repr(k) for k in allowed)
                raise self.error(
                    _where(*path),
                    f"unknown {'' if path else 'top-level '}key {key!r}; "
                    f"{_suggest(key, allowed)}the keys allowed here are {names}",
                )

    def names(self, value: object, path: tuple[str | int, ...], roles: Mapping) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise self.error(
                _where(*path),
                f"expected a list of role names such as [\"worker\"], got {_show(value)}",
            )
        for i, name in enumerate(value):
            if not isinstance(name, str):
                raise self.error(_where(*path, i), f"role name must be a str, got {_show(name)}")
            if name not in roles:
                defined = ", ".join(sorted(roles)) or "none"
                raise self.error(
                    _where(*path, i),
                    f"unknown role {name!r}; {_suggest(name, sorted(roles))}defined roles: "
                    f"{defined}; define it under \"roles\" or fix the name",
                )
        return tuple(value)

    def patterns(self, value: object, path: tuple[str | int, ...]) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise self.error(
                _where(*path),
                f"expected a list of subject patterns such as [\"grad.>\"], got {_show(value)}",
            )
        for i, p in enumerate(value):
            try:
                validate_pattern(p, allow_reserved=True)
            except InvalidSubject as exc:
                raise self.error(_where(*path, i), str(exc)) from None
            if _is_reserved(p):
                raise self.error(
                    _where(*path, i),
                    f"pattern {p!r} names the mesh's own '_mesh' subjects, which are always "
                    "allowed and cannot be restricted; remove it",
                )
        return tuple(value)

    def perm(self, value: object, path: tuple[str | int, ...]) -> _Perm:
        if isinstance(value, Mapping):
            self.keys(value, path, _PERM_KEYS)
            return _Perm(
                allow=self.patterns(value.get("allow", ()), (*path, "allow")),
                deny=self.patterns(value.get("deny", ()), (*path, "deny")),
            )
        if isinstance(value, (list, tuple)):
            return _Perm(allow=self.patterns(value, path))
        hint = f"; write {json.dumps([value])}" if isinstance(value, str) else ""
        raise self.error(
            _where(*path),
            "expected a list of allowed subject patterns or {\"allow\": [...], \"deny\": [...]}, "
            f"got {_show(value)}{hint}",
        )

    def parse(self, doc: object) -> tuple[dict[str, _Role], list[tuple[str, tuple[str, ...]]], tuple[str, ...]]:
        if not isinstance(doc, Mapping):
            raise self.error(
                "",
                "expected a dict (a JSON object or TOML table) with the keys 'roles', 'nodes' "
                f"and 'default', got {_show(doc)}",
            )
        self.keys(doc, (), _TOP_KEYS)
        raw_roles = doc.get("roles", {})
        if not isinstance(raw_roles, Mapping):
            raise self.error(
                "roles",
                "expected a dict of role name -> {\"publish\": [...], \"subscribe\": [...]}, "
                f"got {_show(raw_roles)}",
            )
        roles: dict[str, _Role] = {}
        for name, body in raw_roles.items():
            if not isinstance(name, str) or not name:
                raise self.error("roles", f"role names must be non-empty strings, got {_show(name)}")
            path = ("roles", name)
            if not isinstance(body, Mapping):
                raise self.error(
                    _where(*path),
                    "expected a dict with \"publish\" and/or \"subscribe\" such as "
                    f"{{\"publish\": [\"grad.>\"]}}, got {_show(body)}",
                )
            self.keys(body, path, _ROLE_KEYS)
            roles[name] = _Role(
                publish=self.perm(body.get("publish", ()), (*path, "publish")),
                subscribe=self.perm(body.get("subscribe", ()), (*path, "subscribe")),
            )
        raw_nodes = doc.get("nodes", {})
        if not isinstance(raw_nodes, Mapping):
            raise self.error(
                "nodes",
                "expected a dict of node-name glob -> list of roles such as "
                f"{{\"worker-*\": [\"worker\"]}}, got {_show(raw_nodes)}",
            )
        nodes: list[tuple[str, tuple[str, ...]]] = []
        for glob, names in raw_nodes.items():
            if not isinstance(glob, str) or not glob:
                raise self.error(
                    "nodes",
                    f"node-name globs must be non-empty strings such as \"worker-*\", got "
                    f"{_show(glob)}",
                )
            nodes.append((glob, self.names(names, ("nodes", glob), roles)))
        default = self.names(doc.get("default", ()), ("default",), roles)
        return roles, nodes, default


def _toml_module() -> Any:
    """tomllib (Python >= 3.11), else the tomli backport, imported only when a TOML file is read."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "reading a TOML policy needs Python >= 3.11 (tomllib) or the tomli package; "
                "write the policy as JSON or `pip install tomli`"
            ) from None
    return tomllib


# --------------------------------------------------------------------------- Policy


class Policy:
    """Per-subject permissions of the nodes of a cluster (format and rules: module docstring).

    ``Policy(config)`` takes a dict; :meth:`load` reads a JSON or TOML file; :meth:`from_any`
    accepts whichever of those a caller was given. ``cache_size`` bounds each of the two answer
    caches, (name, subject) -> bool for publish and (name, pattern) -> bool for subscribe; 0
    disables them."""

    __slots__ = (
        "_by_name",
        "_by_roles",
        "_cache_size",
        "_default",
        "_nodes",
        "_pub_cache",
        "_roles",
        "_sub_cache",
        "source",
    )

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        source: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ConfigError(
                f"cache_size must be an int >= 0 (0 disables the cache), got {cache_size!r}"
            )
        self._roles, self._nodes, self._default = _Parser(source).parse(config)
        self.source = source  # the file it came from, for messages and status output
        self._cache_size = cache_size
        self._pub_cache: dict[tuple[str, str], bool] = {}
        self._sub_cache: dict[tuple[str, str], bool] = {}
        self._by_name: dict[str, _Compiled] = {}
        self._by_roles: dict[frozenset[str], _Compiled] = {}

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, cache_size: int = DEFAULT_CACHE_SIZE) -> Policy:
        """Read a policy from a ``.json`` or ``.toml`` file (chosen by extension)."""
        fspath = os.fspath(path)
        if not isinstance(fspath, str):
            raise ConfigError(f"policy path must be a str or os.PathLike[str], got {_show(path)}")
        suffix = Path(fspath).suffix.lower()
        if suffix not in (".json", ".toml"):
            raise ConfigError(
                f"policy file {fspath!r} has the extension {suffix or '(none)'!r}; "
                "name it *.json or *.toml so its format is known"
            )
        try:
            data = Path(fspath).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read policy file {fspath!r}: {exc.strerror or exc}; check the path"
            ) from exc
        if suffix == ".json":
            try:
                doc = json.loads(data)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise ConfigError(
                    f"policy file {fspath!r} is not valid JSON: {exc}; fix the syntax (JSON "
                    "allows no comments or trailing commas)"
                ) from None
        else:
            toml = _toml_module()
            try:
                doc = toml.loads(data.decode("utf-8"))
            except ValueError as exc:  # TOMLDecodeError and UnicodeDecodeError
                raise ConfigError(
                    f"policy file {fspath!r} is not valid TOML: {exc}; fix the syntax"
                ) from None
        return cls(doc, source=fspath, cache_size=cache_size)

    @overload
    @classmethod
    def from_any(cls, policy: None) -> None: ...

    @overload
    @classmethod
    def from_any(
        cls, policy: Policy | Mapping[str, Any] | str | os.PathLike[str]
    ) -> Policy: ...

    @classmethod
    def from_any(
        cls, policy: Policy | Mapping[str, Any] | str | os.PathLike[str] | None
    ) -> Policy | None:
        """None (no policy: nothing to enforce) stays None; a Policy is returned as is; a dict
        is parsed; a str or path-like is a file for :meth:`load`."""
        if policy is None or isinstance(policy, Policy):
            return policy
        if isinstance(policy, Mapping):
            return cls(policy)
        if isinstance(policy, (str, os.PathLike)):
            return cls.load(policy)
        raise ConfigError(
            "policy must be None, a dict, a path to a .json or .toml file or a mesh.policy."
            f"Policy, got {_show(policy)}"
        )

    # -- queries ----------------------------------------------------------------------------

    def roles_of(self, name: str) -> frozenset[str]:
        """Roles of node ``name``: the union over every matching ``nodes`` glob, else
        ``default``."""
        return self._compiled(name).roles

    def may_publish(self, name: str, subject: str) -> bool:
        """May node ``name`` publish to the literal ``subject``? Cached; raises
        :class:`~mesh.errors.InvalidSubject` if ``subject`` is not a valid subject."""
        try:
            return self._pub_cache[name, subject]
        except (KeyError, TypeError):  # TypeError: unhashable junk, reported by the miss
            return self._publish_miss(name, subject)

    def _publish_miss(self, name: str, subject: str) -> bool:
        _check_name(name)
        validate_subject(subject, allow_reserved=True)
        ok = _is_reserved(subject) or self._compiled(name).publish_ok(subject)
        self._pub_cache = _put(self._pub_cache, (name, subject), ok, self._cache_size)
        return ok

    def may_subscribe(self, name: str, pattern: str) -> bool:
        """May node ``name`` subscribe to ``pattern`` (wildcards allowed)? Cached; raises
        :class:`~mesh.errors.InvalidSubject` if ``pattern`` is not a valid pattern."""
        try:
            return self._sub_cache[name, pattern]
        except (KeyError, TypeError):
            return self._subscribe_miss(name, pattern)

    def _subscribe_miss(self, name: str, pattern: str) -> bool:
        _check_name(name)
        validate_pattern(pattern, allow_reserved=True)
        ok = _is_reserved(pattern) or self._compiled(name).subscribe_ok(pattern)
        self._sub_cache = _put(self._sub_cache, (name, pattern), ok, self._cache_size)
        return ok

    def check_publish(self, name: str, subject: str) -> None:
        """Raise :class:`~mesh.errors.PermissionDenied` unless :meth:`may_publish`."""
        if not self.may_publish(name, subject):
            raise PermissionDenied(self._explain("publish", name, subject))

    def check_subscribe(self, name: str, pattern: str) -> None:
        """Raise :class:`~mesh.errors.PermissionDenied` unless :meth:`may_subscribe`."""
        if not self.may_subscribe(name, pattern):
            raise PermissionDenied(self._explain("subscribe", name, pattern))

    def describe(self) -> dict[str, Any]:
        """The policy as a JSON-serialisable dict in the input format (normalised: every
        permission as ``{"allow": [...], "deny": [...]}``); ``Policy(p.describe())`` is
        equivalent to ``p``."""
        return {
            "roles": {
                name: {
                    kind: {"allow": list(perm.allow), "deny": list(perm.deny)}
                    for kind, perm in (("publish", role.publish), ("subscribe", role.subscribe))
                }
                for name, role in self._roles.items()
            },
            "nodes": {glob: list(names) for glob, names in self._nodes},
            "default": list(self._default),
        }

    def __repr__(self) -> str:
        src = f" source={self.source!r}" if self.source else ""
        return f"<Policy roles={len(self._roles)} nodes={len(self._nodes)}{src}>"

    # -- internals --------------------------------------------------------------------------

    def _compiled(self, name: str) -> _Compiled:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            pass
        _check_name(name)
        roles = frozenset(self._resolve(name))
        # Many names share a role set: compile each set once.
        compiled = self._by_roles.get(roles)
        if compiled is None:
            compiled = _Compiled(roles, self._roles)
            self._by_roles = _put(self._by_roles, roles, compiled, _NAME_CACHE_SIZE)
        self._by_name = _put(self._by_name, name, compiled, _NAME_CACHE_SIZE)
        return compiled

    def _resolve(self, name: str) -> list[str]:
        matched = [names for glob, names in self._nodes if fnmatch.fnmatchcase(name, glob)]
        if not matched:
            return list(self._default)
        return [r for names in matched for r in names]

    def _explain(self, kind: str, name: str, s: str) -> str:
        """The PermissionDenied message: who, what, why, and what to change in the policy."""
        roles = sorted(self.roles_of(name))
        verb = "publish to" if kind == "publish" else "subscribe to"
        who = f"node {name!r}" + (f" (roles: {', '.join(roles)})" if roles else "")
        head = f"{who} may not {verb} {s!r}"
        src = f" (policy {self.source})" if self.source else ""
        if not roles:
            globs = [glob for glob, _ in self._nodes if fnmatch.fnmatchcase(name, glob)]
            why = (
                f"the \"nodes\" entries {globs} matching its name give it no roles"
                if globs
                else "its name matches no entry under \"nodes\" and \"default\" gives no roles"
            )
            fix = (
                f"give it a role in the policy, e.g. add \"{name}\": [\"<role>\"] under \"nodes\" "
                "(keys are globs such as \"worker-*\"), or set \"default\""
            )
            return f"{head}: {why}; {fix}{src}"
        toks = s.split(".")
        perms = [(r, getattr(self._roles[r], kind)) for r in roles]
        for role, perm in perms:
            for d in perm.deny:
                hit = _matches(d.split("."), toks) if kind == "publish" else _intersect(
                    d.split("."), toks
                )
                if hit:
                    where = _where("roles", role, kind, "deny")
                    if kind == "publish":
                        why = f"it matches the deny pattern {d!r} of role {role!r} ({where})"
                        fix = "narrow or remove that deny pattern, or publish elsewhere"
                    else:
                        why = (
                            f"it overlaps the deny pattern {d!r} of role {role!r} ({where}), so "
                            "it could receive denied subjects"
                        )
                        fix = (
                            "subscribe to a narrower pattern that avoids it, or narrow or "
                            "remove that deny pattern"
                        )
                    return f"{head}: {why}, and deny wins over every allow; {fix}{src}"
        allowed = [p for _, perm in perms for p in perm.allow]
        shown = ", ".join(repr(p) for p in allowed[:_MAX_LISTED])
        if len(allowed) > _MAX_LISTED:
            shown += f" and {len(allowed) - _MAX_LISTED} more"
        if kind == "publish":
            why = "no publish allow pattern of its roles matches it"
            need = "matches"
        else:
            why = (
                "no single subscribe allow pattern of its roles covers it (a subscription must "
                "lie entirely within one allow pattern)"
            )
            need = "covers"
        gerund = "publishing" if kind == "publish" else "subscribing"
        why += f"; its roles allow {shown}" if allowed else f"; its roles allow no {gerund} at all"
        fix = (
            f"add a pattern that {need} {s!r} to {_where('roles', roles[0], kind)} (or another "
            "of its roles), or give the node a role that allows it under \"nodes\""
        )
        return f"{head}: {why}; {fix}{src}"


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"node name must be a str, got {_show(name)}")
