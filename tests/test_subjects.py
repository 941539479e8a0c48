"""Tests for mesh.subjects: validation tables, wildcard semantics, the trie and its cache.

Edge cases are pinned in tables in the spirit of nats-server's sublist_test.go; hypothesis
properties compare everything against small independent reference implementations.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import mesh.subjects as subjects_mod
from mesh.errors import ConfigError, InvalidSubject, MeshError
from mesh.subjects import (
    MAX_SUBJECT_LEN,
    MAX_TOKENS,
    SubjectTrie,
    is_literal,
    matches,
    validate_pattern,
    validate_subject,
)

# Deterministic and quick: fixed seed, no example database written into the tree.
FAST = settings(derandomize=True, database=None, deadline=None, max_examples=300)


# --------------------------------------------------------------------------- references
# Written independently of mesh.subjects (no regex sharing, no token walk sharing).


def ref_token_ok(tok: str, *, wildcards: bool) -> bool:
    if tok == "":
        return False
    if tok in ("*", ">"):
        return wildcards
    for ch in tok:
        code = ord(ch)
        if ch in ".*>" or ch.isspace() or code < 0x20 or 0x7F <= code <= 0x9F:
            return False
        if 0xD800 <= code <= 0xDFFF:
            return False
    return True


def ref_valid(s: object, *, pattern: bool) -> bool:
    if not isinstance(s, str) or not s or len(s) > MAX_SUBJECT_LEN:
        return False
    tokens = s.split(".")
    if len(tokens) > MAX_TOKENS:
        return False
    if not all(ref_token_ok(t, wildcards=pattern) for t in tokens):
        return False
    return ">" not in tokens[:-1]


def ref_match(ptoks: list[str], stoks: list[str]) -> bool:
    """Recursive definition: '>' eats one or more tokens, '*' exactly one."""
    if not ptoks:
        return not stoks
    head, rest = ptoks[0], ptoks[1:]
    if head == ">":
        return len(stoks) >= 1
    if not stoks:
        return False
    return (head == "*" or head == stoks[0]) and ref_match(rest, stoks[1:])


def ref_matches(pattern: str, subject: str) -> bool:
    return ref_match(pattern.split("."), subject.split("."))


# --------------------------------------------------------------------------- validation

VALID_SUBJECTS = [
    "foo",
    "foo.bar",
    "grad.w3.layer1",
    "a.b.c.d.e.f",
    "foo-bar.baz_1",
    "$SYS.foo",
    "foo#.bar!",
    "ünïcode.主题",
    "_meshy.x",  # first token is not exactly _mesh
    "x._mesh.y",
    "_MESH.x",  # case matters
    "a" * MAX_SUBJECT_LEN,
    ".".join(["a"] * MAX_TOKENS),
]

# (subject, fragment the message must contain)
INVALID_SUBJECTS = [
    ("", "empty"),
    (".", "starts with '.'"),
    ("..", "starts with '.'"),
    (".foo", "starts with '.'"),
    ("foo.", "ends with '.'"),
    ("foo..bar", "contains '..'"),
    ("foo bar", "whitespace"),
    (" foo", "whitespace"),
    ("foo ", "whitespace"),
    ("foo\tbar", "whitespace"),
    ("foo\n", "whitespace"),
    ("foo\r.bar", "whitespace"),
    ("foo.\u00a0", "whitespace"),  # no-break space
    ("foo\u2028bar", "whitespace"),  # line separator
    ("foo\u3000bar", "whitespace"),  # ideographic space
    ("foo\x00bar", "control character"),
    ("foo\x1b[0m", "control character"),
    ("foo\x7f", "control character"),
    ("foo\x9f", "control character"),
    ("foo\ud800", "surrogate"),
    ("*", "wildcard"),
    (">", "wildcard"),
    ("foo.*", "wildcard"),
    ("foo.>", "wildcard"),
    ("*.foo", "wildcard"),
    ("a*", "mixing a wildcard"),
    ("*b", "mixing a wildcard"),
    ("a>b", "mixing a wildcard"),
    (">>", "mixing a wildcard"),
    ("**", "mixing a wildcard"),
    ("foo.*bar", "mixing a wildcard"),
    ("foo.bar>", "mixing a wildcard"),
    ("a" * (MAX_SUBJECT_LEN + 1), "over the limit of 1024"),
    (".".join(["a"] * (MAX_TOKENS + 1)), "over the limit of 64"),
]

VALID_PATTERNS = [
    "foo",
    "foo.bar",
    "*",
    ">",
    "foo.*",
    "foo.>",
    "*.*",
    "*.>",
    "*.foo.*",
    "foo.*.bar.>",
    ".".join(["*"] * MAX_TOKENS),
    ".".join(["a"] * (MAX_TOKENS - 1) + [">"]),
]

INVALID_PATTERNS = [
    ("", "empty"),
    ("foo..*", "contains '..'"),
    (".>", "starts with '.'"),
    ("*.", "ends with '.'"),
    ("foo.>.bar", "must be the last token"),
    (">.foo", "must be the last token"),
    (">.>", "must be the last token"),
    ("a*", "mixing a wildcard"),
    ("*b", "mixing a wildcard"),
    ("a>b", "mixing a wildcard"),
    (">>", "mixing a wildcard"),
    ("**", "mixing a wildcard"),
    ("*>", "mixing a wildcard"),
    ("foo.* ", "whitespace"),
    ("foo.*\x00", "control character"),
    ("*" * 2 + ".x", "mixing a wildcard"),
    (".".join(["*"] * (MAX_TOKENS + 1)), "over the limit of 64"),
    (".".join(["a"] * MAX_TOKENS + [">"]), "over the limit of 64"),
    ("a" * (MAX_SUBJECT_LEN - 1) + ".>", "over the limit of 1024"),
]

NOT_STR = [None, 1, 1.5, True, b"foo.bar", bytearray(b"foo"), ["foo"], ("foo",), {"foo"}, object()]


@pytest.mark.parametrize("subject", VALID_SUBJECTS)
def test_valid_subjects(subject: str) -> None:
    assert validate_subject(subject) is subject
    # Every valid subject is also a valid (literal) pattern.
    assert validate_pattern(subject) is subject
    assert is_literal(subject)


@pytest.mark.parametrize(("subject", "why"), INVALID_SUBJECTS)
def test_invalid_subjects(subject: str, why: str) -> None:
    with pytest.raises(InvalidSubject) as info:
        validate_subject(subject, allow_reserved=True)
    msg = str(info.value)
    assert why in msg
    assert msg.startswith("subject ")
    if len(subject) <= 80:
        assert repr(subject) in msg  # quoted, control characters visible
    else:
        assert repr(subject[:60]) in msg and f"({len(subject)} characters)" in msg


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) is pattern


@pytest.mark.parametrize(("pattern", "why"), INVALID_PATTERNS)
def test_invalid_patterns(pattern: str, why: str) -> None:
    with pytest.raises(InvalidSubject) as info:
        validate_pattern(pattern, allow_reserved=True)
    assert why in str(info.value)
    assert str(info.value).startswith("pattern ")


@pytest.mark.parametrize(
    ("subject", "why"), [(s, w) for s, w in INVALID_SUBJECTS if "wildcard" not in w]
)
def test_invalid_subjects_are_invalid_patterns(subject: str, why: str) -> None:
    with pytest.raises(InvalidSubject, match=re.escape(why)):
        validate_pattern(subject)


def test_messages_say_how_to_fix() -> None:
    cases = {
        "foo..bar": "remove the extra '.'",
        "foo bar": "use '_' or '-' instead",
        "a*": "must stand alone as a whole token",
        "foo.*": "only allowed in subscribe patterns",
        "_mesh.x": "choose another first token",
        "": "such as 'orders.eu.new'",
    }
    for subject, fix in cases.items():
        with pytest.raises(InvalidSubject, match=re.escape(fix)):
            validate_subject(subject)
    with pytest.raises(InvalidSubject, match=r"use '\*' to match exactly one token"):
        validate_pattern("a.>.b")


@pytest.mark.parametrize("bad", NOT_STR, ids=lambda v: type(v).__name__)
def test_non_str_raises_invalid_subject_not_type_error(bad: object) -> None:
    for fn in (validate_subject, validate_pattern, is_literal):
        with pytest.raises(InvalidSubject, match="must be a str") as info:
            fn(bad)  # type: ignore[arg-type]
        assert not isinstance(info.value, TypeError)
    with pytest.raises(InvalidSubject):
        matches("foo", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSubject):
        matches(bad, "foo")  # type: ignore[arg-type]
    with pytest.raises(InvalidSubject, match="must be a str"):
        SubjectTrie().match(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSubject, match="must be a str"):
        SubjectTrie().insert(bad, 1)  # type: ignore[arg-type]


def test_invalid_subject_is_mesh_and_value_error() -> None:
    with pytest.raises(MeshError):
        validate_subject("a..b")
    with pytest.raises(ValueError):
        validate_subject("a..b")


def test_str_subclass_is_accepted() -> None:
    class Sub(str):
        pass

    assert validate_subject(Sub("foo.bar")) == "foo.bar"
    trie: SubjectTrie[int] = SubjectTrie()
    trie.insert("foo.bar", 1)
    assert trie.match(Sub("foo.bar")) == (1,)


# --------------------------------------------------------------------------- reserved


@pytest.mark.parametrize("subject", ["_mesh.x", "_mesh.a.b.c", "_mesh"])
def test_reserved_subjects(subject: str) -> None:
    with pytest.raises(InvalidSubject, match="reserved"):
        validate_subject(subject)
    assert validate_subject(subject, allow_reserved=True) == subject
    with pytest.raises(InvalidSubject, match="reserved"):
        validate_pattern(subject)
    assert validate_pattern(subject, allow_reserved=True) == subject


@pytest.mark.parametrize("pattern", ["_mesh.>", "_mesh.*", "_mesh.*.x"])
def test_reserved_patterns(pattern: str) -> None:
    with pytest.raises(InvalidSubject, match="reserved"):
        validate_pattern(pattern)
    assert validate_pattern(pattern, allow_reserved=True) == pattern


@pytest.mark.parametrize("pattern", [">", "*", "*.x", "*.>", "*._mesh", "x._mesh.>"])
def test_wildcard_patterns_are_not_reserved(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


def test_reserved_check_runs_after_syntax_check() -> None:
    # A broken reserved subject reports the syntax problem, even with allow_reserved.
    with pytest.raises(InvalidSubject, match="ends with"):
        validate_subject("_mesh.", allow_reserved=True)


# --------------------------------------------------------------------------- is_literal


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        ("foo", True),
        ("foo.bar", True),
        ("_mesh.x", True),  # reservation is not a syntax question
        ("*", False),
        (">", False),
        ("foo.*", False),
        ("foo.>", False),
        ("*.bar", False),
    ],
)
def test_is_literal(pattern: str, literal: bool) -> None:
    assert is_literal(pattern) is literal


@pytest.mark.parametrize("pattern", ["a*", "a>b", ">>", "", "a..b", "a.>.b"])
def test_is_literal_rejects_invalid(pattern: str) -> None:
    with pytest.raises(InvalidSubject):
        is_literal(pattern)


# --------------------------------------------------------------------------- matching

MATCH_TABLE = [
    ("foo", "foo", True),
    ("foo", "bar", False),
    ("foo", "foo.bar", False),
    ("foo.bar", "foo", False),
    ("foo.bar", "foo.bar.baz", False),
    ("foo.bar.baz", "foo.bar", False),
    ("foo.*", "foo.bar", True),
    ("foo.*", "foo", False),  # '*' needs a token
    ("foo.*", "foo.bar.baz", False),  # '*' is exactly one token
    ("*", "foo", True),
    ("*", "foo.bar", False),
    ("*.*", "foo", False),
    ("*.*", "foo.bar", True),
    ("*.bar", "foo.bar", True),
    ("*.bar", "foo.baz", False),
    ("foo.*.baz", "foo.bar.baz", True),
    ("foo.*.baz", "foo.bar.qux", False),
    ("foo.*.baz", "foo.baz", False),
    ("foo.>", "foo.bar", True),
    ("foo.>", "foo.bar.baz", True),
    ("foo.>", "foo", False),  # '>' needs at least one token
    ("foo.>", "bar.baz", False),
    (">", "foo", True),
    (">", "foo.bar.baz", True),
    (">", "_mesh.x", True),  # matching is syntax; reservation is enforced on validate
    ("*.>", "foo", False),
    ("*.>", "foo.bar", True),
    ("*.*.>", "a.b", False),
    ("*.*.>", "a.b.c", True),
    ("foo.*.>", "foo.bar.baz.qux", True),
    ("_mesh.>", "_mesh.ctl.ping", True),
    ("a+", "aa", False),  # tokens are literal text, never regex
    ("a.b", "a$b", False),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_TABLE)
def test_matches_table(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected
    assert ref_matches(pattern, subject) is expected  # keeps the reference honest
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert(pattern, "v")
    assert trie.match(subject) == (("v",) if expected else ())


@pytest.mark.parametrize(
    ("pattern", "subject"),
    [("a..b", "a"), ("a", "a..b"), ("a", "a.*"), ("a.*", "a.>"), ("a>", "a"), ("a", " a")],
)
def test_matches_rejects_invalid(pattern: str, subject: str) -> None:
    with pytest.raises(InvalidSubject):
        matches(pattern, subject)


# --------------------------------------------------------------------------- trie basics


def test_empty_trie() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    assert trie.match("foo") == ()
    assert len(trie) == 0
    assert trie.patterns() == []
    assert trie.remove("foo", 1) is False


def test_insert_match_and_dedup_across_patterns() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    for p in ("foo.bar", "foo.*", "foo.>", "*.bar", ">"):
        trie.insert(p, "a")
    trie.insert("foo.bar", "b")
    assert trie.match("foo.bar") == ("a", "b")  # 'a' once, although five patterns match
    assert trie.match("foo.baz") == ("a",)
    assert trie.match("foo") == ("a",)  # only '>'
    assert len(trie) == 6
    assert trie.patterns() == ["foo.bar", "foo.*", "foo.>", "*.bar", ">"]


def test_star_and_gt_semantics_in_trie() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("foo.*", "star")
    trie.insert("foo.>", "gt")
    trie.insert("foo", "lit")
    assert trie.match("foo") == ("lit",)
    assert trie.match("foo.bar") == ("star", "gt")
    assert trie.match("foo.bar.baz") == ("gt",)
    assert trie.match("bar.foo") == ()


def test_result_order_is_value_insertion_order() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("other", "z")  # z enters first, under an unrelated pattern
    trie.insert("a.>", "y")
    trie.insert("a.b", "x")
    trie.insert("a.*", "z")
    assert trie.match("a.b") == ("z", "y", "x")
    # Removing z's last pair and re-inserting moves it to the end.
    trie.remove("other", "z")
    assert trie.match("a.b") == ("z", "y", "x")  # z still present via a.*
    trie.remove("a.*", "z")
    trie.insert("a.*", "z")
    assert trie.match("a.b") == ("y", "x", "z")


def test_order_within_one_pattern_follows_values() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.insert("q", 2)
    trie.insert("p", 1)
    trie.insert("p", 2)  # 2 entered the trie before 1
    assert trie.match("p") == (2, 1)


def test_refcounts() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("foo.*", "v")
    trie.insert("foo.*", "v")
    assert len(trie) == 1  # distinct pairs
    assert trie.match("foo.x") == ("v",)
    assert trie.remove("foo.*", "v") is True
    assert trie.match("foo.x") == ("v",)  # one reference left
    assert len(trie) == 1
    assert trie.remove("foo.*", "v") is True
    assert trie.match("foo.x") == ()
    assert len(trie) == 0
    assert trie.remove("foo.*", "v") is False


def test_remove_unknown_pairs() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("foo.*", "v")
    trie.insert("foo.>", "w")
    assert trie.remove("foo.bar", "v") is False  # a literal is not the wildcard pattern
    assert trie.remove("foo.*", "w") is False  # right pattern, wrong value
    assert trie.remove("foo.>", "v") is False
    assert trie.remove("*.*", "v") is False
    assert trie.remove("foo", "v") is False  # prefix node exists but holds nothing
    assert trie.remove("nope.x.y", "v") is False
    assert len(trie) == 2
    assert trie.match("foo.bar") == ("v", "w")


def test_remove_and_insert_validate() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    for bad in ("a..b", "a*", "a.>.b", "", "a b"):
        with pytest.raises(InvalidSubject):
            trie.insert(bad, "v")
        with pytest.raises(InvalidSubject):
            trie.remove(bad, "v")
    assert len(trie) == 0 and trie._root.is_empty()


def test_unhashable_value_is_type_error_and_changes_nothing() -> None:
    trie: SubjectTrie[object] = SubjectTrie()
    trie.insert("x", 1)
    trie.match("a.b")
    with pytest.raises(TypeError, match="hashable"):
        trie.insert("a.b", [1])
    with pytest.raises(TypeError, match="hashable"):
        trie.remove("a.b", {})
    assert trie._root.lits.keys() == {"x"}
    assert trie.match("a.b") == ()
    assert len(trie) == 1


def test_prunes_empty_nodes() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    pats = ["a.b.c", "a.*.c", "a.>", "*.*.*.>", ">", "a.b", "x"]
    for i, p in enumerate(pats):
        trie.insert(p, i)
    trie.insert("a.b.c", 99)
    for i, p in enumerate(pats):
        assert trie.remove(p, i)
    assert not trie._root.is_empty()  # a.b.c -> 99 still there
    assert list(trie._root.lits) == ["a"] and trie._root.star is None
    assert trie.remove("a.b.c", 99)
    assert trie._root.is_empty()
    assert trie.patterns() == []


def test_partial_prune_keeps_shared_prefix() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.insert("a.b.c.d", 1)
    trie.insert("a.b", 2)
    trie.remove("a.b.c.d", 1)
    b = trie._root.lits["a"].lits["b"]
    assert b.lits == {} and b.vals == {2: b.vals[2]}
    assert trie.match("a.b") == (2,)


def test_reserved_patterns_allowed_in_trie() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("_mesh.ctl.*", "ctl")
    trie.insert(">", "all")
    assert trie.match("_mesh.ctl.ping") == ("ctl", "all")
    assert trie.match("_mesh") == ("all",)


def test_values_of_any_hashable_type() -> None:
    trie: SubjectTrie[object] = SubjectTrie()
    vals: list[object] = [1, "1", (1,), frozenset({1}), None, 1.5]
    for v in vals:
        trie.insert("x.*", v)
    assert trie.match("x.y") == tuple(vals)


@pytest.mark.parametrize("bad", [-1, "10", 1.0, True, None])
def test_bad_cache_size(bad: object) -> None:
    with pytest.raises(ConfigError, match="cache_size"):
        SubjectTrie(cache_size=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cache


def test_cache_hits_and_misses() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.insert("foo.*", 1)
    first = trie.match("foo.bar")
    assert (trie.cache_hits, trie.cache_misses) == (0, 1)
    assert trie.match("foo.bar") is first  # the cached tuple itself
    assert (trie.cache_hits, trie.cache_misses) == (1, 1)
    trie.match("nothing.here")
    trie.match("nothing.here")  # empty results are cached too
    assert (trie.cache_hits, trie.cache_misses) == (2, 2)


def test_cache_hit_does_not_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.insert("foo.>", 1)
    assert trie.match("foo.bar") == (1,)

    def boom(_: str) -> None:
        raise AssertionError("validated on a cache hit")

    monkeypatch.setattr(subjects_mod, "_SUBJECT_OK", boom)
    monkeypatch.setattr(subjects_mod, "_explain", boom)
    assert trie.match("foo.bar") == (1,)
    with pytest.raises(AssertionError):  # a miss does validate
        trie.match("foo.baz")


@pytest.mark.parametrize("bad", ["foo.*", "foo.>", "foo..bar", "", "foo bar", "*", "a*"])
def test_match_invalid_subject_raises_and_is_not_cached(bad: str) -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.insert(">", 1)
    trie.insert("foo.*", 2)
    for _ in range(2):
        with pytest.raises(InvalidSubject):
            trie.match(bad)
    assert bad not in trie._cache
    assert (trie.cache_hits, trie.cache_misses) == (0, 0)


def test_pattern_text_is_not_a_subject() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    trie.insert("foo.*", 1)
    with pytest.raises(InvalidSubject, match="wildcard"):
        trie.match("foo.*")  # never treated as a literal


def test_insert_invalidates_matching_entries_only() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("a.b", "x")
    for s in ("a.b", "a.c", "b.c", "a.b.c"):
        trie.match(s)
    trie.insert("a.*", "y")  # matches a.b and a.c, not b.c or a.b.c
    assert set(trie._cache) == {"b.c", "a.b.c"}
    assert trie.match("a.b") == ("x", "y")
    assert trie.match("a.c") == ("y",)
    hits = trie.cache_hits
    assert trie.match("b.c") == ()
    assert trie.match("a.b.c") == ()
    assert trie.cache_hits == hits + 2  # survivors were served from the cache


def test_literal_insert_drops_only_its_subject() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    for s in ("a.b", "a.c"):
        trie.match(s)
    trie.insert("a.b", "x")
    assert set(trie._cache) == {"a.c"}
    assert trie.match("a.b") == ("x",)


def test_gt_insert_clears_everything() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    for s in ("a", "a.b", "_mesh.x"):
        trie.match(s)
    trie.insert(">", "all")
    assert trie._cache == {}
    for s in ("a", "a.b", "_mesh.x"):
        assert trie.match(s) == ("all",)


def test_remove_invalidates() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("a.>", "x")
    trie.insert("a.b", "y")
    trie.insert("z", "z")
    assert trie.match("a.b") == ("x", "y")
    assert trie.match("a.b.c") == ("x",)
    assert trie.match("z") == ("z",)
    trie.remove("a.>", "x")
    assert "z" in trie._cache  # unrelated entry kept
    assert trie.match("a.b") == ("y",)
    assert trie.match("a.b.c") == ()
    trie.remove("a.b", "y")
    assert trie.match("a.b") == ()


def test_refcount_changes_keep_cache() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("a.*", "x")
    trie.match("a.b")
    trie.insert("a.*", "x")  # refcount 2: results unchanged
    assert "a.b" in trie._cache
    trie.remove("a.*", "x")  # refcount 1: still present
    assert "a.b" in trie._cache
    assert trie.match("a.b") == ("x",)
    trie.remove("a.*", "x")
    assert "a.b" not in trie._cache
    assert trie.match("a.b") == ()


def test_failed_remove_keeps_cache() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.insert("a.*", "x")
    trie.match("a.b")
    assert trie.remove("a.*", "nope") is False
    assert trie.remove(">", "x") is False
    assert "a.b" in trie._cache


def test_regex_special_tokens_invalidate_correctly() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    for s in ("a+.x", "aa.x", "a$.x", "(a).x", "a\\.x"):
        trie.match(s)
    trie.insert("a+.*", "v")  # 'a+' must stay a literal token, not a regex
    assert set(trie._cache) == {"aa.x", "a$.x", "(a).x", "a\\.x"}
    assert trie.match("a+.x") == ("v",)
    assert trie.match("aa.x") == ()


def test_cache_is_bounded_and_drops_older_half() -> None:
    trie: SubjectTrie[int] = SubjectTrie(cache_size=8)
    trie.insert(">", 1)
    for i in range(100):
        assert trie.match(f"s.{i}") == (1,)
        assert len(trie._cache) <= 8
    # After the last eviction the newest entries survive.
    assert "s.99" in trie._cache and "s.0" not in trie._cache
    trie2: SubjectTrie[int] = SubjectTrie(cache_size=8)
    for i in range(8):
        trie2.match(f"s.{i}")
    trie2.match("s.8")  # full: the older half goes
    assert list(trie2._cache) == ["s.4", "s.5", "s.6", "s.7", "s.8"]


@pytest.mark.parametrize("size", [0, 1, 2])
def test_tiny_caches(size: int) -> None:
    trie: SubjectTrie[int] = SubjectTrie(cache_size=size)
    trie.insert("a.*", 1)
    for _ in range(3):
        for s in ("a.b", "a.c", "b"):
            trie.match(s)
            assert len(trie._cache) <= size
    assert trie.match("a.b") == (1,)
    if size == 0:
        assert trie.cache_hits == 0 and trie._cache == {}


# --------------------------------------------------------------------------- properties

TEXT_ALPHABET = ["a", "b", "é", ".", "*", ">", " ", "\t", "\x00", "\x7f", "\x85", "\u2028", "_"]
text = st.lists(st.sampled_from(TEXT_ALPHABET), max_size=8).map("".join)

# Literal tokens include regex metacharacters so a missing re.escape would show.
LIT = ["a", "b", "aa", "a+"]
sub_tokens = st.lists(st.sampled_from(LIT), min_size=1, max_size=5)
subject_st = sub_tokens.map(".".join)


@st.composite
def pattern_st(draw: st.DrawFn) -> str:
    toks = draw(st.lists(st.sampled_from([*LIT, "*"]), min_size=0, max_size=4))
    if not toks or draw(st.booleans()):
        toks.append(">")
    return ".".join(toks)


@FAST
@given(text)
def test_validation_agrees_with_reference(s: str) -> None:
    for pattern, fn in ((False, validate_subject), (True, validate_pattern)):
        if ref_valid(s, pattern=pattern):
            assert fn(s, allow_reserved=True) == s
        else:
            with pytest.raises(InvalidSubject) as info:
                fn(s, allow_reserved=True)
            # The slow path always finds a specific reason, never the generic fallback.
            assert not str(info.value).endswith("is invalid")


@FAST
@given(st.integers(1, 3), st.integers(MAX_TOKENS - 2, MAX_TOKENS + 2), st.booleans())
def test_limits_agree_with_reference(width: int, ntok: int, gt_last: bool) -> None:
    toks = ["x" * width] * ntok
    if gt_last:
        toks[-1] = ">"
    s = ".".join(toks)
    for pattern, fn in ((False, validate_subject), (True, validate_pattern)):
        ok = ref_valid(s, pattern=pattern)
        assert ok == (len(s) <= MAX_SUBJECT_LEN and ntok <= MAX_TOKENS and (pattern or not gt_last))
        if ok:
            fn(s)
        else:
            with pytest.raises(InvalidSubject):
                fn(s)


@FAST
@given(pattern_st(), subject_st)
def test_matches_agrees_with_reference(pattern: str, subject: str) -> None:
    expected = ref_matches(pattern, subject)
    assert matches(pattern, subject) is expected
    # The regex used for cache invalidation must agree too.
    assert bool(subjects_mod._pattern_regex(pattern).fullmatch(subject)) is expected


@FAST
@given(
    st.lists(st.tuples(pattern_st(), st.integers(0, 5)), max_size=25),
    st.lists(subject_st, min_size=1, max_size=10),
)
def test_trie_match_equals_brute_force(pairs: list[tuple[str, int]], subjects: list[str]) -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    order: dict[int, None] = {}
    for p, v in pairs:
        trie.insert(p, v)
        order.setdefault(v, None)
    for s in subjects + subjects:  # second round is served from the cache
        expected = tuple(v for v in order if any(ref_matches(p, s) for p, w in pairs if w == v))
        assert trie.match(s) == expected
    assert len(trie) == len(set(pairs))
    assert trie.patterns() == list(dict.fromkeys(p for p, _ in pairs))


class TrieMachine(RuleBasedStateMachine):
    """Random insert/remove/match sequences against a refcounting model."""

    @initialize(cache_size=st.sampled_from([0, 1, 3, 4096]))
    def setup(self, cache_size: int) -> None:
        self.trie: SubjectTrie[int] = SubjectTrie(cache_size=cache_size)
        self.refs: dict[tuple[str, int], int] = {}
        self.order: dict[int, None] = {}  # values present, in first-insertion order

    def expected(self, subject: str) -> tuple[int, ...]:
        hits = {v for (p, v) in self.refs if ref_matches(p, subject)}
        return tuple(v for v in self.order if v in hits)

    @rule(pattern=pattern_st(), value=st.integers(0, 4))
    def insert(self, pattern: str, value: int) -> None:
        self.trie.insert(pattern, value)
        self.refs[(pattern, value)] = self.refs.get((pattern, value), 0) + 1
        self.order.setdefault(value, None)

    @rule(pattern=pattern_st(), value=st.integers(0, 4))
    def remove(self, pattern: str, value: int) -> None:
        key = (pattern, value)
        existed = key in self.refs
        assert self.trie.remove(pattern, value) is existed
        if existed:
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key]
                if not any(v == value for _, v in self.refs):
                    del self.order[value]

    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        if self.refs:
            pattern, value = data.draw(st.sampled_from(sorted(self.refs)))
            self.remove(pattern, value)

    @rule(subject=subject_st)
    def match(self, subject: str) -> None:
        assert self.trie.match(subject) == self.expected(subject)

    @invariant()
    def consistent(self) -> None:
        assert len(self.trie) == len(self.refs)
        assert set(self.trie.patterns()) == {p for p, _ in self.refs}
        if not self.refs:
            assert self.trie._root.is_empty()  # everything pruned
        # Every cached entry is still correct (no stale results after a change).
        for subject, result in self.trie._cache.items():
            assert result == self.expected(subject), subject


TrieMachine.TestCase.settings = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow],
)
test_trie_state_machine = TrieMachine.TestCase
