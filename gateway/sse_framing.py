"""Cutting an upstream's server-sent-event stream into whole events, with no I/O.

An upstream writes its event stream in chunks that need not end on an event boundary. The
relay forwards only whole events (each ends with a blank line, ``\\n\\n``), so a chunk's
trailing partial event waits for the next chunk. The stream ends at ``data: [DONE]``:
anything the upstream writes after it is read (so its connection can be reused) and dropped.

Source: the event stream format of the WHATWG HTML standard, section 9.2 (server-sent
events), as OpenAI's streams use it (LF line ends, ``data: [DONE]`` last).
"""

from __future__ import annotations

from gateway.usage import DONE_EVENT

EVENT_END = b"\n\n"
DONE_TAIL = DONE_EVENT + EVENT_END


class SseFramer:
    """The whole events in a stream of upstream chunks, one ``feed`` per chunk.

    ``feed`` returns the whole events completed by a chunk (possibly none) and keeps the
    partial event after them as ``tail``. Once ``end`` is called (the relay sent the final
    ``[DONE]``), every later chunk is dropped. Each method is a few slice operations: this
    runs once per upstream chunk on the streaming hot path.
    """

    __slots__ = ("ended", "tail")

    def __init__(self) -> None:
        self.tail = b""
        self.ended = False

    def feed(self, chunk: bytes) -> bytes:
        """The whole events that ``chunk`` completes: the kept tail and the chunk up to and
        including its last ``\\n\\n``; ``b""`` when the chunk completes none, or after
        ``end``. What follows the last ``\\n\\n`` becomes the new ``tail``."""
        if self.ended:
            return b""
        if self.tail:
            chunk = self.tail + chunk
        cut = chunk.rfind(EVENT_END) + 2
        if cut < 2:
            self.tail = chunk
            return b""
        if cut == len(chunk):
            self.tail = b""
            return chunk
        self.tail = chunk[cut:]
        return chunk[:cut]

    def is_final(self, events: bytes) -> bool:
        """Whether ``events`` (what ``feed`` returned, or the part of it to be sent) ends the
        stream: it ends with ``data: [DONE]`` and no partial event waits behind it."""
        return not self.tail and events.endswith(DONE_TAIL)

    def end(self) -> None:
        """The stream's last event has been taken: later chunks are dropped."""
        self.ended = True

    def close(self) -> bytes:
        """At the upstream's end of stream: the partial tail as a last whole event (a blank
        line appended), or ``b""`` when the tail is empty or only whitespace."""
        tail, self.tail = self.tail, b""
        return tail + EVENT_END if tail.strip() else b""
