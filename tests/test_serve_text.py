"""Streamed text deltas: their concatenation is exactly the final (stop-cut) text."""

from __future__ import annotations

from selfmtp.serving.text import TextDeltas


class CharTokenizer:
    """One token per character; '?' decodes to the replacement character (half a multi-byte char)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\ufffd" if chr(i) == "?" else chr(i) for i in ids)


def stream(text: str, final: str, stops: list[str]) -> list[str]:
    """Deltas after each character but the last, then the rest of `final` (the row ends on that pass)."""
    deltas, ids = TextDeltas(CharTokenizer(), stops), []
    parts = []
    for char in text[:-1]:
        ids.append(ord(char))
        parts.append(deltas.delta(ids))
    return [*parts, deltas.final(final)]


def test_a_possible_stop_string_start_is_held_back_until_settled():
    parts = stream("ab Q:", "ab ", ["Q:"])  # "Q" may begin "Q:": never sent, and the stop cut the text there
    assert parts == ["a", "b", " ", "", ""]
    parts = stream("ab Qxy", "ab Qxy", ["Q:"])  # "Q" followed by "x" was no stop after all: sent late
    assert parts == ["a", "b", " ", "", "Qx", "y"]
    assert stream("Q Q:", "Q ", ["Q:"]) == ["", "Q ", "", ""]


def test_half_a_character_waits_for_the_rest():
    assert stream("a?x", "ab", []) == ["a", "", "b"]
