"""A1111's `<lora:name:weight>` tags: found anywhere, removed from the encoded text, weights checked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdengine import GenerationRequest, InvalidRequest
from sdengine.loratags import parse_lora_tags
from sdengine.request import check_request

# Text around the tags: anything without `<`, so it holds no tag of its own.
text = st.text(st.characters(blacklist_characters="<", blacklist_categories=["Cs"]), max_size=30)
names = st.text(
    st.characters(blacklist_characters=":>", blacklist_categories=["Cs", "Zs", "Cc"]), min_size=1, max_size=12
)
spaces = st.sampled_from(["", " ", "  "])
weights = st.sampled_from(["0.8", "-1", ".5", "1", "2", "-0.25", "1.0"])


@given(text)
def test_text_without_tags_is_unchanged(prompt: str) -> None:
    assert parse_lora_tags(prompt) == (prompt, ())


@given(
    st.lists(
        st.tuples(text, names, spaces, st.one_of(st.none(), weights)), max_size=4, unique_by=lambda t: t[1].strip()
    ),
    text,
)
def test_tags_anywhere_are_removed_and_read(parts: list[tuple[str, str, str, str | None]], tail: str) -> None:
    prompt, expected_text, expected = "", "", []
    for before, name, pad, weight in parts:
        if not name.strip():
            continue
        tag = f"<lora:{pad}{name}{pad}>" if weight is None else f"<lora:{pad}{name}{pad}:{pad}{weight}{pad}>"
        prompt += before + tag
        expected_text += before
        expected.append((name.strip(), 1.0 if weight is None else float(weight)))
    assert parse_lora_tags(prompt + tail) == (expected_text + tail, tuple(expected))


def test_other_extra_networks_stay_in_the_text() -> None:
    assert parse_lora_tags("a cat <hypernet:x:1>") == ("a cat <hypernet:x:1>", ())


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("a cat <lora:x:2.5>", "between -2 and 2"),
        ("a cat <lora:x:-3>", "between -2 and 2"),
        ("a cat <lora:x:heavy>", "not a number"),
        ("a cat <lora:x:nan>", "not a number"),
        ("a cat <lora::1>", "no name"),
        ("a cat <lora:x:1:2>", "too many parts"),
        ("<lora:x:1> a cat <lora:x:0.5>", "named twice"),
    ],
)
def test_bad_tags_get_one_sentence(prompt: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says) as info:
        check_request(GenerationRequest(prompt))
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)


def test_weights_at_the_bounds_pass() -> None:
    check_request(GenerationRequest("a cat <lora:x:-2> <lora:y:2>"))
