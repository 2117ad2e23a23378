"""Streamed text: what one pass adds to a response, never text the final response will not hold."""

from __future__ import annotations


class TextDeltas:
    """Decode a row's tokens after every pass and hand out only the new, settled text.

    Held back until a later pass settles them: a trailing replacement character (a multi-byte
    character split across passes) and a tail that could be the start of a stop string (the final
    text is cut before the stop string). So the concatenated deltas equal the non-streamed text.
    """

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.sent = ""

    def delta(self, token_ids: list[int]) -> str:
        text = self._settled(self.tokenizer.decode(token_ids, skip_special_tokens=True))
        if not text.startswith(self.sent):  # a later token changed how earlier ones decode: wait
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new

    def final(self, text: str) -> str:
        """The rest of the finished response's `text` (which starts with everything sent)."""
        if not text.startswith(self.sent):
            raise RuntimeError(f"streamed {self.sent!r} is not a prefix of the final text {text!r}")
        rest, self.sent = text[len(self.sent) :], text
        return rest

    def _settled(self, text: str) -> str:
        text = text.rstrip("\ufffd")
        held = 0
        for stop in self.stop_strings:  # the longest tail that a stop string starts with
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return text[: len(text) - held]
