from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from kwatt.text import REPLACEMENT, clean_text, decode_bytes, is_clean


def test_filesystem_name_with_invalid_utf8_becomes_encodable() -> None:
    name = os.fsdecode(b"bad-\xff\xfe.service")
    assert not is_clean(name)
    cleaned = clean_text(name)
    assert cleaned == f"bad-{REPLACEMENT}{REPLACEMENT}.service"
    cleaned.encode("utf-8")


def test_lone_surrogate_from_json_is_replaced() -> None:
    assert clean_text("team-\ud800") == f"team-{REPLACEMENT}"


def test_decode_bytes_replaces_each_bad_byte() -> None:
    assert decode_bytes(b"0::/x\xffy\n") == f"0::/x{REPLACEMENT}y\n"


@given(st.text())
def test_valid_text_is_unchanged_and_any_text_encodes(value: str) -> None:
    cleaned = clean_text(value)
    cleaned.encode("utf-8")
    if is_clean(value):
        assert cleaned == value
    assert len(cleaned) == len(value)
