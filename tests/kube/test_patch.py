"""The JSON Patch diff: RFC 6901 escaping, and applying diff(a, b) to a gives b for any JSON."""

from __future__ import annotations

import json

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.kube.patch import diff, pointer

keys = st.sampled_from(["a", "b", "x/y", "m~n", "~1", "env", ""])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


def test_pointer_escapes_tilde_then_slash() -> None:
    assert pointer(["metadata", "annotations", "sidecar.agents.io/status"]) == \
        "/metadata/annotations/sidecar.agents.io~1status"
    assert pointer(["a~/b", 0]) == "/a~0~1b/0"
    assert pointer([]) == ""


def test_list_changes_are_inserts_and_appends() -> None:
    before = {"init": [{"name": "migrate"}], "env": [{"name": "A"}]}
    after = {"init": [{"name": "sidecar"}, {"name": "migrate"}], "env": [{"name": "A"}, {"name": "B"}],
             "new": {"x": 1}}
    assert diff(before, after) == [
        {"op": "add", "path": "/init/0", "value": {"name": "sidecar"}},
        {"op": "add", "path": "/env/-", "value": {"name": "B"}},
        {"op": "add", "path": "/new", "value": {"x": 1}},
    ]


def test_a_type_change_is_a_replace_not_a_merge() -> None:
    assert diff({"a": 1}, {"a": True}) == [{"op": "replace", "path": "/a", "value": True}]
    assert diff([1, 2], [1]) == [{"op": "replace", "path": "", "value": [1]}]


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_applying_the_diff_gives_the_target(before, after) -> None:
    patched = jsonpatch.apply_patch(before, diff(before, after))
    assert json.dumps(patched, sort_keys=True) == json.dumps(after, sort_keys=True)
