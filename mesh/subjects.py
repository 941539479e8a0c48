"""Subject validation and matching (NATS style).

A subject is dot-separated tokens: ``grad.w3.layer1``. In a *pattern*, ``*`` matches exactly one
token and ``>`` matches one or more tokens and may only be the last token. Wildcards are whole
tokens, never literal characters: ``a*`` or ``a>b`` is an error, not a subject.

Invalid input raises :class:`mesh.errors.InvalidSubject` at the call, never a silent mismatch:
the empty string, empty tokens (leading, trailing or double dots), whitespace, control characters
or lone surrogates anywhere, wildcards inside a token, ``>`` not last, more than
:data:`MAX_SUBJECT_LEN` characters or :data:`MAX_TOKENS` tokens, and anything that is not a
``str``. Subjects and patterns whose first token is ``_mesh`` are reserved for the mesh itself.

:class:`SubjectTrie` maps patterns to values like nats-server's sublist: a token trie with a
per-subject result cache, so that matching a hot subject is one dict lookup.

Pure Python, no I/O, no threads, no locks: see :class:`SubjectTrie` about thread safety.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from itertools import islice
from typing import Generic, TypeVar

from mesh.errors import ConfigError, InvalidSubject

__all__ = [
    "MAX_SUBJECT_LEN",
    "MAX_TOKENS",
    "RESERVED_PREFIX",
    "SubjectTrie",
    "is_literal",
    "matches",
    "validate_pattern",
    "validate_subject",
]

MAX_SUBJECT_LEN = 1024
MAX_TOKENS = 64
RESERVED_PREFIX = "_mesh."
_RESERVED_TOKEN = "_mesh"

# Characters no token may hold: separators, wildcards, whitespace (\s is str.isspace), control
# characters (Unicode Cc) and lone surrogates (they cannot be encoded as UTF-8 on the wire).
_BAD_CHARS = r"\s\x00-\x1f\x7f-\x9f\ud800-\udfff"
_TOK = rf"[^.*>{_BAD_CHARS}]+"
_PTOK = rf"(?:{_TOK}|\*)"
# Fast path: one C-level fullmatch (token count capped by the repeat bound) accepts every valid
# input; only failures take the slow path that works out a helpful message.
_SUBJECT_OK = re.compile(rf"(?:{_TOK}\.){{0,{MAX_TOKENS - 1}}}{_TOK}").fullmatch
_PATTERN_OK = re.compile(rf"(?:{_PTOK}\.){{0,{MAX_TOKENS - 1}}}(?:{_PTOK}|>)").fullmatch
_BAD_CHAR_RE = re.compile(rf"[{_BAD_CHARS}]")

_EXAMPLE = "'orders.eu.new'"


def _quote(s: str) -> str:
    """repr() so control characters show, shortened so huge inputs don't flood logs."""
    if len(s) > 80:
        return f"{s[:60]!r}... ({len(s)} characters)"
    return repr(s)


def _describe_char(ch: str) -> str:
    code = ord(ch)
    if 0xD800 <= code <= 0xDFFF:
        return f"a lone surrogate U+{code:04X} (not encodable as UTF-8)"
    if ch.isspace():
        return f"whitespace U+{code:04X} ({ch!r})"
    return f"control character U+{code:04X} ({ch!r})"


def _explain(s: object, *, pattern: bool) -> str:
    """Say what is wrong with ``s`` and how to fix it (slow path, only on failure)."""
    kind = "pattern" if pattern else "subject"
    if not isinstance(s, str):
        return (
            f"{kind} must be a str, got {type(s).__name__} {repr(s)[:60]}; "
            f"pass dot-separated text such as {_EXAMPLE}"
        )
    q = _quote(s)
    if not s:
        return f"{kind} '' is empty; use dot-separated tokens such as {_EXAMPLE}"
    if len(s) > MAX_SUBJECT_LEN:
        return (
            f"{kind} {q} is {len(s)} characters long, over the limit of {MAX_SUBJECT_LEN}; "
            "use a shorter subject"
        )
    bad = _BAD_CHAR_RE.search(s)
    if bad is not None:
        return (
            f"{kind} {q} contains {_describe_char(bad.group())} at index {bad.start()}; "
            "subjects may not contain whitespace or control characters, use '_' or '-' instead"
        )
    tokens = s.split(".")
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if not tok:
            where = (
                "starts with '.'" if i == 0 else "ends with '.'" if i == last else "contains '..'"
            )
            return (
                f"{kind} {q} {where} (empty token at position {i}); "
                "remove the extra '.' so every token is non-empty"
            )
        if tok in ("*", ">"):
            if not pattern:
                return (
                    f"subject {q} contains the wildcard {tok!r} at position {i}; a publish "
                    "subject must be literal, wildcards are only allowed in subscribe patterns"
                )
            if tok == ">" and i != last:
                return (
                    f"pattern {q} has '>' at position {i} of {last + 1} tokens; '>' matches "
                    "the rest of the subject so it must be the last token (use '*' to match "
                    "exactly one token)"
                )
        elif "*" in tok or ">" in tok:
            return (
                f"{kind} {q} has token {tok!r} mixing a wildcard with other characters; "
                "'*' and '>' are never literal characters and must stand alone as a whole "
                "token, as in 'a.*.c' or 'a.>'"
            )
    if len(tokens) > MAX_TOKENS:
        return (
            f"{kind} {q} has {len(tokens)} tokens, over the limit of {MAX_TOKENS}; use fewer tokens"
        )
    # Unreachable unless the fast-path regex and this function disagree.
    return f"{kind} {q} is invalid"  # pragma: no cover


def _reserved_message(s: str, *, pattern: bool) -> str:
    kind = "pattern" if pattern else "subject"
    return (
        f"{kind} {_quote(s)} is reserved: subjects whose first token is '{_RESERVED_TOKEN}' are "
        "used by the mesh itself; choose another first token"
    )


def _is_reserved(s: str) -> bool:
    return s.startswith(RESERVED_PREFIX) or s == _RESERVED_TOKEN


def validate_subject(subject: str, *, allow_reserved: bool = False) -> str:
    """Return ``subject`` if it is a valid publish subject (no wildcards), else raise
    :class:`InvalidSubject`. Reserved (``_mesh.``) subjects need ``allow_reserved=True``."""
    if not (
        isinstance(subject, str)
        and len(subject) <= MAX_SUBJECT_LEN
        and _SUBJECT_OK(subject) is not None
    ):
        raise InvalidSubject(_explain(subject, pattern=False))
    if not allow_reserved and _is_reserved(subject):
        raise InvalidSubject(_reserved_message(subject, pattern=False))
    return subject


def validate_pattern(pattern: str, *, allow_reserved: bool = False) -> str:
    """Return ``pattern`` if it is a valid subscribe pattern, else raise :class:`InvalidSubject`.

    A pattern is reserved only if its first token is literally ``_mesh``: ``>`` and ``*.x`` are
    not reserved (matching is purely syntactic; keeping users away from mesh traffic is the
    caller's policy)."""
    if not (
        isinstance(pattern, str)
        and len(pattern) <= MAX_SUBJECT_LEN
        and _PATTERN_OK(pattern) is not None
    ):
        raise InvalidSubject(_explain(pattern, pattern=True))
    if not allow_reserved and _is_reserved(pattern):
        raise InvalidSubject(_reserved_message(pattern, pattern=True))
    return pattern


def is_literal(pattern: str) -> bool:
    """True if the (valid) pattern has no wildcard token. Raises :class:`InvalidSubject` if the
    pattern is invalid, so ``'a*'`` is an error rather than a literal."""
    validate_pattern(pattern, allow_reserved=True)
    return _is_literal_valid(pattern)


def _is_literal_valid(pattern: str) -> bool:
    # In a valid pattern '*' and '>' only occur as whole tokens, so a character test suffices.
    return "*" not in pattern and ">" not in pattern


def matches(pattern: str, subject: str) -> bool:
    """Reference matcher: does ``pattern`` match the publish ``subject``?

    Both are validated (reserved names allowed: matching is syntax, not permission), so an
    invalid argument raises :class:`InvalidSubject` instead of quietly not matching."""
    validate_pattern(pattern, allow_reserved=True)
    validate_subject(subject, allow_reserved=True)
    if _is_literal_valid(pattern):
        return pattern == subject
    return _match_tokens(pattern.split("."), subject.split("."))


def _match_tokens(ptoks: list[str], stoks: list[str]) -> bool:
    n = len(stoks)
    for i, p in enumerate(ptoks):
        if p == ">":
            return n > i  # '>' needs at least one token: 'a.>' does not match 'a'
        if i >= n or (p != "*" and p != stoks[i]):
            return False
    return len(ptoks) == n


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Regex matching exactly the *valid* subjects ``pattern`` matches (cache invalidation).

    Only used against cached keys, which are valid subjects: no empty tokens, so '[^.]+' is one
    token and '.+' after a dot is one or more whole tokens."""
    parts = [
        "[^.]+" if tok == "*" else ".+" if tok == ">" else re.escape(tok)
        for tok in pattern.split(".")
    ]
    return re.compile(r"\.".join(parts))


V = TypeVar("V", bound=Hashable)


class _Node:
    """One trie level. ``vals`` holds values of patterns ending here, ``fwc`` values of patterns
    ending in '>' right after this node; both map value -> the value's sequence number (the
    same in every bucket, so merging buckets needs no min())."""

    __slots__ = ("fwc", "lits", "star", "vals")

    def __init__(self) -> None:
        self.lits: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.vals: dict = {}
        self.fwc: dict = {}

    def is_empty(self) -> bool:
        return not self.lits and self.star is None and not self.vals and not self.fwc


_EMPTY: tuple = ()


class SubjectTrie(Generic[V]):
    """pattern -> set of values, like nats-server's sublist.

    ``match(subject)`` returns every value whose pattern matches, each value once, ordered by
    when the value was first inserted (under any pattern). A value whose last pair is removed
    and that is inserted again later moves to the end.

    Results are cached per subject: a cache hit is one dict lookup and does not re-validate the
    subject. The cache holds at most ``cache_size`` subjects (0 disables it); when full, the
    older half is dropped (FIFO). Inserting a new pair or removing a pair's last reference drops
    only the cached subjects its pattern matches; refcount changes leave the cache alone.

    Not thread-safe: ``match`` writes the cache too. Use one instance from a single thread, or
    guard every call (``match`` included) with the same lock.
    """

    __slots__ = (
        "_cache",
        "_cache_size",
        "_patterns",
        "_refs",
        "_root",
        "_seq",
        "_values",
        "cache_hits",
        "cache_misses",
    )

    def __init__(self, cache_size: int = 4096) -> None:
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ConfigError(
                f"cache_size must be an int >= 0 (0 disables the cache), got {cache_size!r}"
            )
        self._root = _Node()
        self._cache: dict[str, tuple[V, ...]] = {}
        self._cache_size = cache_size
        self._refs: dict[tuple[str, V], int] = {}  # (pattern, value) -> refcount
        self._patterns: dict[str, int] = {}  # pattern -> number of distinct values under it
        self._values: dict[V, list[int]] = {}  # value -> [sequence number, pairs holding it]
        self._seq = 0  # next value sequence number (result order)
        self.cache_hits = 0
        self.cache_misses = 0

    # -- mutation ---------------------------------------------------------------------------

    def insert(self, pattern: str, value: V) -> None:
        """Add ``value`` under ``pattern``. Inserting the same pair again bumps its refcount;
        it then takes as many :meth:`remove` calls to go away. Reserved patterns are allowed.
        ``value`` must be hashable (TypeError otherwise)."""
        validate_pattern(pattern, allow_reserved=True)
        key = (pattern, value)
        count = _refcount(self._refs, key)  # also rejects unhashable values before any change
        if count:
            self._refs[key] = count + 1  # results unchanged: keep the trie and the cache
            return
        node = self._root
        tokens = pattern.split(".")
        forward = tokens[-1] == ">"
        if forward:
            tokens.pop()
        for tok in tokens:
            if tok == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.lits.get(tok)
                if child is None:
                    child = node.lits[tok] = _Node()
                node = child
        info = self._values.get(value)
        if info is None:
            info = self._values[value] = [self._seq, 0]
            self._seq += 1
        info[1] += 1
        (node.fwc if forward else node.vals)[value] = info[0]
        self._refs[key] = 1
        self._patterns[pattern] = self._patterns.get(pattern, 0) + 1
        self._invalidate(pattern)

    def remove(self, pattern: str, value: V) -> bool:
        """Drop one reference to (pattern, value); True if the pair existed. Nodes left empty
        are pruned. An invalid pattern raises :class:`InvalidSubject`."""
        validate_pattern(pattern, allow_reserved=True)
        key = (pattern, value)
        count = _refcount(self._refs, key)
        if not count:
            return False
        if count > 1:
            self._refs[key] = count - 1  # pair still present: results unchanged
            return True
        del self._refs[key]
        left = self._patterns[pattern] - 1
        if left:
            self._patterns[pattern] = left
        else:
            del self._patterns[pattern]
        info = self._values[value]
        info[1] -= 1
        if not info[1]:
            del self._values[value]
        tokens = pattern.split(".")
        forward = tokens[-1] == ">"
        if forward:
            tokens.pop()
        node = self._root
        path: list[tuple[_Node, str]] = []  # (parent, token) down to node, for pruning
        for tok in tokens:
            child = node.star if tok == "*" else node.lits[tok]
            assert child is not None  # _refs says the pair is in the trie
            path.append((node, tok))
            node = child
        del (node.fwc if forward else node.vals)[value]
        for parent, tok in reversed(path):
            if not node.is_empty():
                break
            if tok == "*":
                parent.star = None
            else:
                del parent.lits[tok]
            node = parent
        self._invalidate(pattern)
        return True

    def _invalidate(self, pattern: str) -> None:
        """Drop cached results the changed pattern could affect (those it matches)."""
        cache = self._cache
        if not cache:
            return
        if _is_literal_valid(pattern):
            cache.pop(pattern, None)
        elif pattern == ">":
            cache.clear()
        else:
            hit = _pattern_regex(pattern).fullmatch
            for subject in [s for s in cache if hit(s)]:
                del cache[subject]

    # -- lookup -----------------------------------------------------------------------------

    def match(self, subject: str) -> tuple[V, ...]:
        """Every value whose pattern matches ``subject``, each once, in insertion order.
        Raises :class:`InvalidSubject` (on a cache miss) if ``subject`` is not a valid publish
        subject; reserved subjects are allowed."""
        try:
            result = self._cache[subject]
        except (KeyError, TypeError):  # TypeError: unhashable non-str, reported by the miss
            return self._match_miss(subject)
        self.cache_hits += 1
        return result

    def _match_miss(self, subject: str) -> tuple[V, ...]:
        # validate_subject() inlined (reserved subjects are fine here); never cache invalid ones.
        if not (
            isinstance(subject, str)
            and len(subject) <= MAX_SUBJECT_LEN
            and _SUBJECT_OK(subject) is not None
        ):
            raise InvalidSubject(_explain(subject, pattern=False))
        self.cache_misses += 1
        buckets = []  # non-empty value dicts of every matching pattern
        nodes = [self._root]
        for tok in subject.split("."):
            nxt = []
            for node in nodes:
                if node.fwc:  # at least this token remains, so '>' here matches
                    buckets.append(node.fwc)
                child = node.lits.get(tok)
                if child is not None:
                    nxt.append(child)
                if node.star is not None:
                    nxt.append(node.star)
            if not nxt:
                break
            nodes = nxt
        else:
            for node in nodes:
                if node.vals:
                    buckets.append(node.vals)
        if not buckets:
            result: tuple[V, ...] = _EMPTY
        else:
            merged = buckets[0]
            if len(buckets) > 1:
                merged = {}
                for bucket in buckets:
                    merged.update(bucket)  # dedupes; a value has one seq in every bucket
            if len(merged) == 1:
                result = tuple(merged)
            else:
                # A bucket's own order is per-pattern, so sort even a single one.
                result = tuple(sorted(merged, key=merged.__getitem__))
        size = self._cache_size
        if size:
            cache = self._cache
            if len(cache) >= size:
                # Drop the older half (FIFO: a hit must not pay for LRU bookkeeping).
                self._cache = cache = dict(islice(cache.items(), len(cache) - size // 2, None))
            cache[subject] = result
        return result

    # -- introspection ----------------------------------------------------------------------

    def patterns(self) -> list[str]:
        """Distinct patterns present, in the order they first appeared."""
        return list(self._patterns)

    def __len__(self) -> int:
        """Number of distinct (pattern, value) pairs (refcounts not included)."""
        return len(self._refs)

    def __repr__(self) -> str:
        return (
            f"<SubjectTrie patterns={len(self._patterns)} pairs={len(self._refs)} "
            f"cached={len(self._cache)} hits={self.cache_hits} misses={self.cache_misses}>"
        )


def _refcount(refs: dict, key: tuple) -> int:
    try:
        return refs.get(key, 0)
    except TypeError:
        raise TypeError(
            f"SubjectTrie values must be hashable, got {type(key[1]).__name__} "
            f"{key[1]!r:.60}; use an id, a tuple or an object with __hash__"
        ) from None


def _bench() -> None:
    """Print ns/op of cached and uncached match() (a micro-benchmark, not a test)."""
    import time

    trie: SubjectTrie[int] = SubjectTrie()
    nocache: SubjectTrie[int] = SubjectTrie(cache_size=0)
    # 200 literal subscriptions, 30 one-token wildcards, 3 catch-alls: ~5 values per subject.
    pats = [f"grad.w{w}.layer{layer}" for w in range(10) for layer in range(20)]
    pats += [f"grad.w{w}.*" for w in range(10)] + [f"grad.*.layer{i}" for i in range(20)]
    pats += ["grad.>", ">", "ctl.*.ping"]
    for n, p in enumerate(pats):
        trie.insert(p, n)
        nocache.insert(p, n)
    subjects = [f"grad.w{w}.layer{layer}" for w in range(10) for layer in range(20)]
    for s in subjects:
        trie.match(s)

    def run(t: SubjectTrie[int], reps: int) -> float:
        match = t.match
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(reps):
                for s in subjects:
                    match(s)
            best = min(best, (time.perf_counter_ns() - start) / (reps * len(subjects)))
        return best

    base = float("inf")
    for _ in range(5):  # loop overhead, to report the match() cost alone
        start = time.perf_counter_ns()
        for _ in range(200):
            for _s in subjects:
                pass
        base = min(base, (time.perf_counter_ns() - start) / (200 * len(subjects)))
    cached = run(trie, 200)
    uncached = run(nocache, 20)
    print(f"{len(trie)} pairs, {len(trie.patterns())} patterns, {len(subjects)} subjects")
    print(f"match cached:   {cached:8.1f} ns/op (loop overhead {base:.1f} ns included)")
    print(f"match uncached: {uncached:8.1f} ns/op (validate + split + walk + sort, 5 values each)")
    start = time.perf_counter_ns()
    for _ in range(20000):
        validate_subject("grad.w3.layer1")
    print(f"validate_subject: {(time.perf_counter_ns() - start) / 20000:6.1f} ns/op")


if __name__ == "__main__":
    _bench()
