"""Streamed text as pieces that are never taken back.

A generation run publishes its whole decoded text so far (``StreamedText``). Two things in
that text may still change: a byte-level piece of a character decodes to "\\ufffd" until the
character is complete, and a stop sequence is cut from the final text. ``TextDeltas`` hands
out only what is settled, so the pieces joined equal the final ``result.text``.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextDeltas:
    """Turn successive full texts into new pieces; ``finish(text)`` gives the rest."""

    def __init__(self, stop_sequences: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stop_sequences if s)
        self.sent = ""

    def _settled(self, text: str) -> str:
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        # hold back an unfinished character and a tail that may begin a stop sequence
        text = text.rstrip("\ufffd")
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        return text[: len(text) - hold] if hold else text

    def update(self, text: str) -> str:
        """The new settled piece of ``text`` (the full text so far); "" when none."""
        settled = self._settled(text)
        if len(settled) <= len(self.sent) or not settled.startswith(self.sent):
            return ""
        piece = settled[len(self.sent) :]
        self.sent = settled
        return piece

    def finish(self, final_text: str) -> str:
        """What is left of the final text after everything sent so far."""
        if not final_text.startswith(self.sent):
            return ""
        piece = final_text[len(self.sent) :]
        self.sent = final_text
        return piece
