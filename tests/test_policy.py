"""Tests for mesh.policy: the rules on examples, every error message, file loading, the cache,
and hypothesis properties against brute-force references that enumerate concrete subjects.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import sys
import time
import types
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ConfigError, InvalidSubject, MeshError, PermissionDenied
from mesh.policy import Policy, pattern_covers, patterns_intersect

try:
    import tomllib
except ImportError:  # Python 3.10: the policy module falls back to tomli the same way
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None  # type: ignore[assignment]

needs_toml = pytest.mark.skipif(tomllib is None, reason="needs Python >= 3.11 or tomli")

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=300)

EXAMPLE: dict[str, Any] = {
    "roles": {
        "worker": {"publish": ["grad.>"], "subscribe": ["params.>", "grad.>"]},
        "ps": {
            "publish": {"allow": ["params.>"], "deny": ["params.secret.>"]},
            "subscribe": ["grad.>"],
        },
        "admin": {"publish": [">"], "subscribe": [">"]},
    },
    "nodes": {"ps-*": ["ps"], "worker-*": ["worker"], "ops": ["admin"]},
    "default": [],
}

EXAMPLE_TOML = """\
default = []

[roles.worker]
publish = ["grad.>"]
subscribe = ["params.>", "grad.>"]

[roles.ps]
publish = { allow = ["params.>"], deny = ["params.secret.>"] }
subscribe = ["grad.>"]

[roles.admin]
publish = [">"]
subscribe = [">"]

[nodes]
"ps-*" = ["ps"]
"worker-*" = ["worker"]
ops = ["admin"]
"""


@pytest.fixture
def policy() -> Policy:
    return Policy(EXAMPLE)


# --------------------------------------------------------------------------- references
# Independent of mesh.policy: match by recursion, cover/intersect by enumerating subjects.

LETTERS = ("a", "b", "c")


def ref_match(ptoks: tuple[str, ...], stoks: tuple[str, ...]) -> bool:
    if not ptoks:
        return not stoks
    head, rest = ptoks[0], ptoks[1:]
    if head == ">":
        return len(stoks) >= 1
    if not stoks:
        return False
    return (head == "*" or head == stoks[0]) and ref_match(rest, stoks[1:])


# Patterns below use at most 4 tokens over {a, b}: 'c' stands for every token they do not name,
# and any difference between them shows on subjects of at most 5 tokens, so this is exact.
SUBJECTS = tuple(
    ".".join(toks) for n in range(1, 6) for toks in itertools.product(LETTERS, repeat=n)
)


@cache
def ref_set(pattern: str) -> frozenset[str]:
    ptoks = tuple(pattern.split("."))
    return frozenset(s for s in SUBJECTS if ref_match(ptoks, tuple(s.split("."))))


def ref_covers(general: str, specific: str) -> bool:
    return ref_set(specific) <= ref_set(general)


def ref_intersect(a: str, b: str) -> bool:
    return bool(ref_set(a) & ref_set(b))


# Every pattern of 1 to 4 tokens over {a, b, *} with an optional final '>' (160 patterns).
ALL_PATTERNS = tuple(
    ".".join(toks)
    for n in range(1, 5)
    for toks in itertools.product(("a", "b", "*", ">"), repeat=n)
    if ">" not in toks[:-1]
)

pattern_st = st.sampled_from(ALL_PATTERNS)
subject_st = st.sampled_from(SUBJECTS)


# --------------------------------------------------------------------------- pattern algebra

COVERS_TABLE = [
    # general, specific, covers, intersects
    ("a", "a", True, True),
    ("a", "b", False, False),
    ("*", "a", True, True),
    ("a", "*", False, True),
    ("*", "*", True, True),
    (">", "a.b.c", True, True),
    (">", "*", True, True),
    (">", ">", True, True),
    ("*", ">", False, True),  # '>' reaches 'a.b', '*' does not
    ("a.>", "a", False, False),  # '>' needs at least one token
    ("a.>", "a.*", True, True),
    ("a.>", "a.b.>", True, True),
    ("a.*", "a.>", False, True),
    ("a.*.>", "a.>", False, True),
    ("a.*", "a.b.c", False, False),
    ("*.b", "a.*", False, True),
    ("a.*.c", "*.b.*", False, True),
    ("a.b", "a.b.c", False, False),
    ("a.b.>", "a.>", False, True),
    ("params.>", "params.secret.>", True, True),
    ("grad.>", "params.>", False, False),
]


@pytest.mark.parametrize(("general", "specific", "covers", "intersects"), COVERS_TABLE)
def test_covers_and_intersects_table(
    general: str, specific: str, covers: bool, intersects: bool
) -> None:
    assert pattern_covers(general, specific) is covers
    assert patterns_intersect(general, specific) is intersects
    assert patterns_intersect(specific, general) is intersects
    if {*general.split("."), *specific.split(".")} <= {"a", "b", "*", ">"}:  # reference's range
        assert ref_covers(general, specific) is covers  # keeps the reference honest
        assert ref_intersect(general, specific) is intersects


def test_reserved_patterns_are_plain_syntax_here() -> None:
    assert pattern_covers(">", "_mesh.x")
    assert patterns_intersect("_mesh.>", "*.x")


@pytest.mark.parametrize(("a", "b"), [("a..b", "a"), ("a", "a.>.b"), ("a*", ">"), (">", ""), (1, "a")])
def test_algebra_rejects_invalid_patterns(a: Any, b: Any) -> None:
    for fn in (pattern_covers, patterns_intersect):
        with pytest.raises(InvalidSubject):
            fn(a, b)
        with pytest.raises(InvalidSubject):
            fn(b, a)


def test_algebra_agrees_with_brute_force_exhaustively() -> None:
    assert len(ALL_PATTERNS) == 160
    for g, s in itertools.product(ALL_PATTERNS, repeat=2):
        assert pattern_covers(g, s) is ref_covers(g, s), (g, s)
        assert patterns_intersect(g, s) is ref_intersect(g, s), (g, s)


@FAST
@given(pattern_st, pattern_st)
def test_covers_and_intersects_agree_with_brute_force(a: str, b: str) -> None:
    assert pattern_covers(a, b) is ref_covers(a, b)
    assert patterns_intersect(a, b) is ref_intersect(a, b)
    assert patterns_intersect(a, b) is patterns_intersect(b, a)


@FAST
@given(pattern_st)
def test_covers_is_reflexive(p: str) -> None:
    assert pattern_covers(p, p)
    assert patterns_intersect(p, p)  # no valid pattern is empty
    assert pattern_covers(">", p)


@FAST
@given(pattern_st, pattern_st, pattern_st)
def test_covers_is_transitive(a: str, b: str, c: str) -> None:
    if pattern_covers(a, b) and pattern_covers(b, c):
        assert pattern_covers(a, c)


@FAST
@given(pattern_st, pattern_st)
def test_covers_implies_intersects(a: str, b: str) -> None:
    if pattern_covers(a, b):
        assert patterns_intersect(a, b)
    if pattern_covers(a, b) and pattern_covers(b, a):
        assert a == b  # distinct valid patterns never match the same set


@FAST
@given(pattern_st, subject_st)
def test_literal_is_covered_iff_matched(p: str, s: str) -> None:
    hit = ref_match(tuple(p.split(".")), tuple(s.split(".")))
    assert pattern_covers(p, s) is hit
    assert patterns_intersect(p, s) is hit


# --------------------------------------------------------------------------- roles


def test_roles_of(policy: Policy) -> None:
    assert policy.roles_of("ps-1") == frozenset({"ps"})
    assert policy.roles_of("worker-7") == frozenset({"worker"})
    assert policy.roles_of("ops") == frozenset({"admin"})
    assert policy.roles_of("ops-2") == frozenset()  # "ops" is an exact name, not a prefix
    assert policy.roles_of("stranger") == frozenset()
    assert isinstance(policy.roles_of("ps-1"), frozenset)


def test_roles_union_of_every_matching_glob() -> None:
    p = Policy(
        {
            "roles": {"a": {}, "b": {}, "c": {}, "d": {}},
            "nodes": {"w-*": ["a"], "w-?": ["b"], "*-1": ["c", "a"], "[xy]-*": ["d"]},
            "default": ["d"],
        }
    )
    assert p.roles_of("w-1") == {"a", "b", "c"}
    assert p.roles_of("w-10") == {"a"}
    assert p.roles_of("x-1") == {"c", "a", "d"}
    assert p.roles_of("W-1") == {"c", "a"}  # case-sensitive on every platform
    assert p.roles_of("z") == {"d"}  # matches nothing: default


def test_default_only_when_nothing_matches() -> None:
    p = Policy(
        {
            "roles": {"user": {"publish": [">"]}},
            "nodes": {"guest-*": []},  # an explicit empty entry still counts as a match
            "default": ["user"],
        }
    )
    assert p.may_publish("anyone", "x")
    assert p.roles_of("guest-1") == frozenset()
    assert not p.may_publish("guest-1", "x")


def test_empty_policy_forbids_everything_but_mesh_traffic() -> None:
    p = Policy({})
    assert p.roles_of("n") == frozenset()
    assert not p.may_publish("n", "a")
    assert not p.may_subscribe("n", ">")
    assert p.may_publish("n", "_mesh.ping")
    assert p.describe() == {"roles": {}, "nodes": {}, "default": []}


# --------------------------------------------------------------------------- publish

PUBLISH_TABLE = [
    ("worker-1", "grad.w1.layer1", True),
    ("worker-1", "grad", False),  # 'grad.>' needs a token after grad
    ("worker-1", "params.x", False),
    ("ps-0", "params.w", True),
    ("ps-0", "params.secret", True),  # 'params.secret.>' needs one more token
    ("ps-0", "params.secret.key", False),  # deny wins within the role
    ("ps-0", "grad.x", False),
    ("ops", "anything.at.all", True),
    ("stranger", "grad.x", False),
]


@pytest.mark.parametrize(("name", "subject", "allowed"), PUBLISH_TABLE)
def test_may_publish(policy: Policy, name: str, subject: str, allowed: bool) -> None:
    for _ in range(2):  # second answer comes from the cache
        assert policy.may_publish(name, subject) is allowed
    if allowed:
        assert policy.check_publish(name, subject) is None
    else:
        with pytest.raises(PermissionDenied):
            policy.check_publish(name, subject)


def test_deny_in_one_role_overrides_allow_in_another() -> None:
    p = Policy(
        {
            "roles": {
                "admin": {"publish": [">"], "subscribe": [">"]},
                "no-secrets": {
                    "publish": {"deny": ["*.secret.>"]},
                    "subscribe": {"deny": ["*.secret.>"]},
                },
            },
            "nodes": {"ops*": ["admin"], "ops-junior": ["no-secrets"]},
        }
    )
    assert p.may_publish("ops", "params.secret.k")
    assert p.may_publish("ops-junior", "params.x")
    assert not p.may_publish("ops-junior", "params.secret.k")
    assert p.may_subscribe("ops-junior", "params.public.>")
    assert not p.may_subscribe("ops-junior", "params.>")  # overlaps the deny
    with pytest.raises(PermissionDenied, match=r"role 'no-secrets' \(roles\.no-secrets\.publish\.deny\)"):
        p.check_publish("ops-junior", "grad.secret.x")


def test_role_without_publish_or_subscribe_allows_nothing_for_it() -> None:
    p = Policy(
        {
            "roles": {"reader": {"subscribe": [">"]}, "writer": {"publish": [">"]}},
            "nodes": {"r": ["reader"], "w": ["writer"]},
        }
    )
    assert p.may_subscribe("r", "a.>") and not p.may_publish("r", "a")
    assert p.may_publish("w", "a") and not p.may_subscribe("w", "a")


def test_deny_only_permission_allows_nothing_by_itself() -> None:
    p = Policy({"roles": {"r": {"publish": {"deny": ["a"]}}}, "default": ["r"]})
    assert not p.may_publish("n", "b")


@pytest.mark.parametrize("subject", ["grad.*", "grad.>", "a..b", "", " x", 5, None])
def test_may_publish_rejects_invalid_subjects(policy: Policy, subject: Any) -> None:
    for _ in range(2):  # never cached
        with pytest.raises(InvalidSubject):
            policy.may_publish("ops", subject)


@pytest.mark.parametrize("name", [None, 5, b"ops", ["ops"]])
def test_name_must_be_str(policy: Policy, name: Any) -> None:
    for call in (policy.may_publish, policy.may_subscribe):
        with pytest.raises(ConfigError, match="node name must be a str"):
            call(name, "grad.x")
    with pytest.raises(ConfigError, match="node name must be a str"):
        policy.roles_of(name)


# --------------------------------------------------------------------------- subscribe

SUBSCRIBE_TABLE = [
    ("worker-1", "params.>", True),
    ("worker-1", "params.*", True),  # covered by params.>
    ("worker-1", "params.w.layer1", True),
    ("worker-1", "grad.*.layer1", True),
    ("worker-1", ">", False),  # wider than any allow pattern
    ("worker-1", "*.x", False),  # params.x is allowed but other.x is not
    ("worker-1", "params", False),
    ("ps-0", "grad.>", True),
    ("ps-0", "params.>", False),
    ("ops", ">", True),
    ("ops", "*.*.>", True),
    ("stranger", "grad.x", False),
]


@pytest.mark.parametrize(("name", "pattern", "allowed"), SUBSCRIBE_TABLE)
def test_may_subscribe(policy: Policy, name: str, pattern: str, allowed: bool) -> None:
    for _ in range(2):
        assert policy.may_subscribe(name, pattern) is allowed
    if allowed:
        assert policy.check_subscribe(name, pattern) is None
    else:
        with pytest.raises(PermissionDenied):
            policy.check_subscribe(name, pattern)


def test_subscribe_deny_rejects_any_overlap() -> None:
    p = Policy({"roles": {"r": {"subscribe": {"allow": [">"], "deny": ["a.secret.*"]}}}, "default": ["r"]})
    assert p.may_subscribe("n", "a.public.x")
    assert p.may_subscribe("n", "a.secret")  # one token short of the deny
    assert not p.may_subscribe("n", "a.secret.x")
    assert not p.may_subscribe("n", "a.*.x")  # could receive a.secret.x
    assert not p.may_subscribe("n", "a.>")
    assert not p.may_subscribe("n", ">")
    assert p.may_subscribe("n", "a.*")


def test_subscribe_needs_one_covering_allow_pattern() -> None:
    # Documented limit: coverage by a union of allow patterns is not enough.
    p = Policy({"roles": {"r": {"subscribe": ["a.*", "a.*.>"]}}, "default": ["r"]})
    assert p.may_subscribe("n", "a.x") and p.may_subscribe("n", "a.x.y.z")
    assert not p.may_subscribe("n", "a.>")


@pytest.mark.parametrize("pattern", ["a..b", "a.>.b", "a*", "", 3])
def test_may_subscribe_rejects_invalid_patterns(policy: Policy, pattern: Any) -> None:
    with pytest.raises(InvalidSubject):
        policy.may_subscribe("ops", pattern)


# --------------------------------------------------------------------------- _mesh traffic


@pytest.mark.parametrize("name", ["ops", "ps-0", "stranger", ""])
def test_mesh_traffic_is_always_allowed(name: str) -> None:
    p = Policy(
        {
            "roles": {"nothing": {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}},
            "default": ["nothing"],
        }
    )
    for subject in ("_mesh.ping", "_mesh.pressure.w1", "_mesh"):
        assert p.may_publish(name, subject)
        p.check_publish(name, subject)
    for pattern in ("_mesh.>", "_mesh.*.x", "_mesh"):
        assert p.may_subscribe(name, pattern)
        p.check_subscribe(name, pattern)
    assert not p.may_publish(name, "x._mesh")  # only the first token counts
    assert not p.may_subscribe(name, "*.ping")  # a wildcard first token is user traffic


# --------------------------------------------------------------------------- messages


def denied(call: Any, *args: str) -> str:
    with pytest.raises(PermissionDenied) as info:
        call(*args)
    assert isinstance(info.value, MeshError)
    return str(info.value)


def test_publish_not_allowed_message(policy: Policy) -> None:
    msg = denied(policy.check_publish, "worker-1", "params.x")
    assert msg.startswith("node 'worker-1' (roles: worker) may not publish to 'params.x': ")
    assert "no publish allow pattern of its roles matches it" in msg
    assert "its roles allow 'grad.>'" in msg
    assert "add a pattern that matches 'params.x' to roles.worker.publish" in msg


def test_publish_denied_message(policy: Policy) -> None:
    msg = denied(policy.check_publish, "ps-0", "params.secret.k")
    assert "node 'ps-0' (roles: ps) may not publish to 'params.secret.k'" in msg
    assert "deny pattern 'params.secret.>' of role 'ps' (roles.ps.publish.deny)" in msg
    assert "deny wins over every allow" in msg
    assert "narrow or remove that deny pattern" in msg


def test_subscribe_not_covered_message(policy: Policy) -> None:
    msg = denied(policy.check_subscribe, "worker-1", ">")
    assert msg.startswith("node 'worker-1' (roles: worker) may not subscribe to '>': ")
    assert "no single subscribe allow pattern of its roles covers it" in msg
    assert "its roles allow 'params.>', 'grad.>'" in msg
    assert "add a pattern that covers '>' to roles.worker.subscribe" in msg


def test_subscribe_overlap_message() -> None:
    p = Policy({"roles": {"r": {"subscribe": {"allow": [">"], "deny": ["a.secret.*"]}}}, "default": ["r"]})
    msg = denied(p.check_subscribe, "n", "a.>")
    assert "overlaps the deny pattern 'a.secret.*' of role 'r' (roles.r.subscribe.deny)" in msg
    assert "subscribe to a narrower pattern that avoids it" in msg


def test_no_roles_messages(policy: Policy) -> None:
    msg = denied(policy.check_publish, "stranger", "grad.x")
    assert msg.startswith("node 'stranger' may not publish to 'grad.x': ")
    assert "matches no entry under \"nodes\" and \"default\" gives no roles" in msg
    assert "add \"stranger\": [\"<role>\"] under \"nodes\"" in msg
    p = Policy({"roles": {"r": {}}, "nodes": {"g-*": []}})
    msg = denied(p.check_subscribe, "g-1", "x")
    assert "the \"nodes\" entries ['g-*'] matching its name give it no roles" in msg


def test_role_that_allows_nothing_message() -> None:
    p = Policy({"roles": {"mute": {"subscribe": [">"]}}, "default": ["mute"]})
    assert "its roles allow no publishing at all" in denied(p.check_publish, "n", "x")


def test_long_allow_list_is_shortened() -> None:
    p = Policy({"roles": {"r": {"publish": [f"t{i}" for i in range(20)]}}, "default": ["r"]})
    msg = denied(p.check_publish, "n", "x")
    assert "'t7' and 12 more" in msg and "'t8'" not in msg


def test_message_names_the_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(EXAMPLE))
    msg = denied(Policy.load(path).check_publish, "worker-1", "params.x")
    assert msg.endswith(f"(policy {path})")


# --------------------------------------------------------------------------- config errors

# (document, fragments the ConfigError message must contain)
CONFIG_ERRORS: list[tuple[Any, list[str]]] = [
    ([], ["policy: expected a dict", "got list"]),
    ("roles", ["policy: expected a dict", "got str"]),
    ({"role": {}}, ["policy: unknown top-level key 'role'", "did you mean 'roles'?"]),
    ({1: {}}, ["policy: keys must be strings, got int 1"]),
    ({"roles": []}, ["policy roles: expected a dict of role name"]),
    ({"roles": {"": {}}}, ["policy roles: role names must be non-empty strings"]),
    ({"roles": {"w": []}}, ["policy roles.w: expected a dict with \"publish\"", "got list"]),
    ({"roles": {"w": {"pub": []}}}, ["policy roles.w: unknown key 'pub'", "did you mean 'publish'?"]),
    ({"roles": {"w": {"publish": "grad.>"}}}, ["policy roles.w.publish: expected a list", 'write ["grad.>"]']),
    ({"roles": {"w": {"publish": 3}}}, ["policy roles.w.publish: expected a list", "got int 3"]),
    ({"roles": {"w": {"publish": ["a", "a..b"]}}}, ["policy roles.w.publish[1]: pattern 'a..b'", "remove the extra '.'"]),
    ({"roles": {"w": {"subscribe": ["a.>.b"]}}}, ["policy roles.w.subscribe[0]: ", "must be the last token"]),
    ({"roles": {"w": {"publish": [None]}}}, ["policy roles.w.publish[0]: pattern must be a str"]),
    ({"roles": {"w": {"publish": {"allow": ["a"], "dney": []}}}}, ["policy roles.w.publish: unknown key 'dney'", "did you mean 'deny'?"]),
    ({"roles": {"w": {"publish": {"deny": "a"}}}}, ["policy roles.w.publish.deny: expected a list of subject patterns"]),
    ({"roles": {"w": {"publish": {"allow": ["a*"]}}}}, ["policy roles.w.publish.allow[0]: ", "must stand alone"]),
    ({"roles": {"w": {"subscribe": ["_mesh.>"]}}}, ["policy roles.w.subscribe[0]: pattern '_mesh.>'", "always allowed", "remove it"]),
    ({"roles": {"w": {"publish": ["_mesh"]}}}, ["roles.w.publish[0]: pattern '_mesh'", "remove it"]),
    ({"roles": {"my role": {"publish": [1]}}}, ["policy roles['my role'].publish[0]: "]),
    ({"nodes": []}, ["policy nodes: expected a dict of node-name glob"]),
    ({"nodes": {"": []}}, ["policy nodes: node-name globs must be non-empty strings"]),
    ({"nodes": {"w-*": "worker"}, "roles": {"worker": {}}}, ["policy nodes['w-*']: expected a list of role names"]),
    ({"nodes": {"w-*": ["wrker"]}, "roles": {"worker": {}}}, ["policy nodes['w-*'][0]: unknown role 'wrker'", "did you mean 'worker'?", "defined roles: worker", "define it under \"roles\""]),
    ({"nodes": {"w": ["x"]}}, ["policy nodes.w[0]: unknown role 'x'", "defined roles: none"]),
    ({"nodes": {"w": [7]}}, ["policy nodes.w[0]: role name must be a str, got int 7"]),
    ({"default": "worker", "roles": {"worker": {}}}, ["policy default: expected a list of role names"]),
    ({"default": ["admin"], "roles": {"worker": {}}}, ["policy default[0]: unknown role 'admin'"]),
]


@pytest.mark.parametrize(("doc", "fragments"), CONFIG_ERRORS, ids=[str(i) for i in range(len(CONFIG_ERRORS))])
def test_config_errors(doc: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Policy(doc)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, MeshError)


def test_tuples_and_mappings_are_accepted() -> None:
    p = Policy(types.MappingProxyType({"roles": {"r": {"publish": ("a.>",)}}, "default": ("r",)}))
    assert p.may_publish("n", "a.b")


@pytest.mark.parametrize("bad", [-1, 1.0, "8", True, None])
def test_bad_cache_size(bad: Any) -> None:
    with pytest.raises(ConfigError, match="cache_size"):
        Policy(EXAMPLE, cache_size=bad)


# --------------------------------------------------------------------------- describe


def test_describe_is_normalised_json_and_round_trips(policy: Policy) -> None:
    d = policy.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["roles"]["worker"] == {
        "publish": {"allow": ["grad.>"], "deny": []},
        "subscribe": {"allow": ["params.>", "grad.>"], "deny": []},
    }
    assert d["roles"]["ps"]["publish"] == {"allow": ["params.>"], "deny": ["params.secret.>"]}
    assert d["nodes"] == EXAMPLE["nodes"]
    assert d["default"] == []
    assert Policy(d).describe() == d
    d["roles"].clear()  # a copy: the policy is unchanged
    assert policy.describe()["roles"]


def test_repr(tmp_path: Path) -> None:
    assert repr(Policy(EXAMPLE)) == "<Policy roles=3 nodes=3>"
    path = tmp_path / "p.json"
    path.write_text("{}")
    assert repr(Policy.load(path)) == f"<Policy roles=0 nodes=0 source={str(path)!r}>"


# --------------------------------------------------------------------------- loading


@needs_toml
def test_load_json_and_toml_agree(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps(EXAMPLE))
    (tmp_path / "p.TOML").write_text(EXAMPLE_TOML)  # extension is case-insensitive
    from_json = Policy.load(tmp_path / "p.json")
    from_toml = Policy.load(str(tmp_path / "p.TOML"))
    assert from_json.describe() == from_toml.describe() == Policy(EXAMPLE).describe()
    assert from_json.source == str(tmp_path / "p.json")
    assert not from_toml.may_publish("ps-1", "params.secret.x")


def test_from_any(tmp_path: Path, policy: Policy) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(EXAMPLE))
    assert Policy.from_any(None) is None
    assert Policy.from_any(policy) is policy
    for x in (EXAMPLE, path, str(path)):
        p = Policy.from_any(x)
        assert isinstance(p, Policy) and p.describe() == policy.describe()
    for bad in (3, b"p.json", ["roles"]):
        with pytest.raises(ConfigError, match="policy must be None, a dict, a path"):
            Policy.from_any(bad)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("p.yaml", "roles: {}", ["has the extension '.yaml'", "name it *.json or *.toml"]),
        ("policy", "{}", ["has the extension '(none)'"]),
        ("p.json", '{"roles": {},}', ["is not valid JSON", "line 1", "no comments or trailing commas"]),
        ("p.json", b"\xff\xfe{", ["is not valid JSON"]),
        pytest.param("p.toml", "[roles\n", ["is not valid TOML", "line 1", "fix the syntax"], marks=needs_toml),
        pytest.param("p.toml", b"x = '\xff'", ["is not valid TOML"], marks=needs_toml),
        ("p.json", "[1, 2]", [" in ", "p.json: expected a dict", "got list"]),
        pytest.param("p.toml", "[roles.w]\npublish = ['a..b']\n", ["policy roles.w.publish[0] in ", "p.toml: pattern 'a..b'"], marks=needs_toml),
    ],
)
def test_load_errors(tmp_path: Path, name: str, content: str | bytes, fragments: list[str]) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_load_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read policy file .*nope\.json.*No such file.*check the path"):
        Policy.load(tmp_path / "nope.json")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read policy file"):
        Policy.load(tmp_path / "dir.toml")
    with pytest.raises(ConfigError, match="must be a str or os.PathLike"):
        Policy.load(b"p.json")  # type: ignore[arg-type]


@needs_toml
def test_toml_falls_back_to_tomli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.toml"
    path.write_text(EXAMPLE_TOML)
    calls = []
    fake = types.ModuleType("tomli")

    def loads(text: str) -> dict[str, Any]:
        calls.append(text)
        return tomllib.loads(text)

    fake.loads = loads  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", fake)
    assert Policy.load(path).roles_of("ops") == {"admin"}
    assert calls == [EXAMPLE_TOML]


def test_toml_without_any_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.toml"
    path.write_text(EXAMPLE_TOML)
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match=re.escape("write the policy as JSON or `pip install tomli`")):
        Policy.load(path)
    (tmp_path / "p.json").write_text(json.dumps(EXAMPLE))
    assert Policy.load(tmp_path / "p.json").roles_of("ops") == {"admin"}  # JSON still works


# --------------------------------------------------------------------------- cache


def test_answers_are_cached(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    assert policy.may_publish("ps-0", "params.w")
    assert not policy.may_subscribe("ps-0", "params.>")
    assert policy._pub_cache == {("ps-0", "params.w"): True}
    assert policy._sub_cache == {("ps-0", "params.>"): False}

    def boom(*_: object) -> bool:
        raise AssertionError("recomputed on a cache hit")

    monkeypatch.setattr(Policy, "_publish_miss", boom)
    monkeypatch.setattr(Policy, "_subscribe_miss", boom)
    assert policy.may_publish("ps-0", "params.w")
    assert not policy.may_subscribe("ps-0", "params.>")
    with pytest.raises(AssertionError):
        policy.may_publish("ps-0", "params.v")


def test_cache_is_bounded() -> None:
    p = Policy(EXAMPLE, cache_size=8)
    for i in range(100):
        assert p.may_publish(f"worker-{i % 13}", f"grad.{i}")
        assert not p.may_publish(f"ps-{i}", f"grad.{i}")
        assert p.may_subscribe("ops", f"x.{i}.>")
        assert len(p._pub_cache) <= 8 and len(p._sub_cache) <= 8
    assert ("ps-99", "grad.99") in p._pub_cache  # the newest survive
    assert ("worker-0", "grad.0") not in p._pub_cache


def test_cache_disabled() -> None:
    p = Policy(EXAMPLE, cache_size=0)
    for _ in range(2):
        assert p.may_publish("ps-0", "params.w")
        assert not p.may_publish("ps-0", "params.secret.w")
        assert p.may_subscribe("worker-1", "grad.*")
    assert p._pub_cache == p._sub_cache == {}
    assert set(p._by_name) == {"ps-0", "worker-1"}  # compiled roles are still kept


def test_cached_check_cost(policy: Policy) -> None:
    """Prints the cost of a cached may_publish (run with -s to see it); asserts no timing."""
    subjects = [f"grad.w{w}.layer{layer}" for w in range(10) for layer in range(20)]
    check = policy.may_publish
    for s in subjects:
        check("worker-3", s)
    reps = 50

    def per_call(body: Any) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter_ns()
            body()
            best = min(best, (time.perf_counter_ns() - start) / (reps * len(subjects)))
        return best

    def hits() -> None:
        for _ in range(reps):
            for s in subjects:
                check("worker-3", s)

    def loop() -> None:
        for _ in range(reps):
            for _s in subjects:
                pass

    hit, overhead = per_call(hits), per_call(loop)
    miss = Policy(EXAMPLE, cache_size=0)
    start = time.perf_counter_ns()
    for s in subjects:
        miss.may_publish("worker-3", s)
    uncached = (time.perf_counter_ns() - start) / len(subjects)
    print(
        f"\ncached may_publish: {hit:.0f} ns/check ({hit - overhead:.0f} ns without the loop); "
        f"uncached: {uncached:.0f} ns/check"
    )


# --------------------------------------------------------------------------- brute force

ROLE_NAMES = ("r0", "r1", "r2")
NAMES = ("n1", "n2", "m1", "m2", "x")
GLOBS = ("n*", "n1", "m?", "*1", "[nm]2", "x")

patterns_st = st.lists(pattern_st, max_size=3)


@st.composite
def policy_doc_st(draw: st.DrawFn) -> dict[str, Any]:
    roles: dict[str, Any] = {}
    for r in ROLE_NAMES:
        role: dict[str, Any] = {}
        for kind in ("publish", "subscribe"):
            allow, deny = draw(patterns_st), draw(st.lists(pattern_st, max_size=2))
            form = draw(st.sampled_from(["missing", "list", "dict"]))
            if form == "list" or (form == "missing" and (allow or deny)):
                role[kind] = allow if not deny else {"allow": allow, "deny": deny}
            elif form == "dict":
                role[kind] = {"allow": allow, "deny": deny}
        roles[r] = role
    role_lists = st.lists(st.sampled_from(ROLE_NAMES), max_size=2)
    nodes = draw(st.dictionaries(st.sampled_from(GLOBS), role_lists, max_size=4))
    return {"roles": roles, "nodes": nodes, "default": draw(role_lists)}


def ref_roles(doc: dict[str, Any], name: str) -> set[str]:
    matched = [roles for glob, roles in doc["nodes"].items() if fnmatch.fnmatchcase(name, glob)]
    if not matched:
        return set(doc["default"])
    return {r for roles in matched for r in roles}


def ref_perm(doc: dict[str, Any], name: str, kind: str) -> tuple[list[str], list[str]]:
    allow: list[str] = []
    deny: list[str] = []
    for r in ref_roles(doc, name):
        perm = doc["roles"][r].get(kind, [])
        if isinstance(perm, dict):
            allow += perm.get("allow", [])
            deny += perm.get("deny", [])
        else:
            allow += perm
    return allow, deny


@settings(FAST, max_examples=200)
@given(policy_doc_st(), st.lists(st.tuples(st.sampled_from(NAMES), subject_st), min_size=1, max_size=8))
def test_may_publish_agrees_with_brute_force(doc: dict[str, Any], checks: list[tuple[str, str]]) -> None:
    p = Policy(doc)
    for name, subject in checks + checks:  # second round from the cache
        allow, deny = ref_perm(doc, name, "publish")
        expected = any(subject in ref_set(a) for a in allow) and not any(
            subject in ref_set(d) for d in deny
        )
        assert p.may_publish(name, subject) is expected
        assert p.roles_of(name) == ref_roles(doc, name)


@settings(FAST, max_examples=200)
@given(policy_doc_st(), st.lists(st.tuples(st.sampled_from(NAMES), pattern_st), min_size=1, max_size=8))
def test_may_subscribe_agrees_with_brute_force(doc: dict[str, Any], checks: list[tuple[str, str]]) -> None:
    p = Policy(doc)
    for name, pattern in checks + checks:
        allow, deny = ref_perm(doc, name, "subscribe")
        expected = any(ref_set(pattern) <= ref_set(a) for a in allow) and not any(
            ref_set(pattern) & ref_set(d) for d in deny
        )
        assert p.may_subscribe(name, pattern) is expected
        if not expected:
            with pytest.raises(PermissionDenied, match=re.escape(f"node {name!r}")):
                p.check_subscribe(name, pattern)


def test_name_cache_is_bounded() -> None:
    p = Policy(EXAMPLE)
    for i in range(3000):
        assert p.roles_of(f"worker-{i}") == {"worker"}
    assert len(p._by_name) <= 1024
    assert len(p._by_roles) == 1  # every worker shares one compiled role set
