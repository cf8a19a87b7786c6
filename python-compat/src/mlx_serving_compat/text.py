"""Turning a stream of token ids into a stream of final text.

`StreamDecoder` keeps a small window of ids: `ids[:read]` is context whose text was already
emitted, `ids[read:]` is pending. After each token it decodes the window; when the text does not
end in U+FFFD (an incomplete UTF-8 sequence) it emits what lies beyond the context's text and
slides the window. Decoding with context keeps neighbour-dependent decoders (SentencePiece's
leading space) right.

`StopMatcher` holds back text that may be the start of a stop string and cuts the output before
the first stop string that completes.
"""

from typing import Callable, List, Sequence, Tuple

from .errors import invalid

REPLACEMENT = "\ufffd"
# A character is at most four bytes: only runs of broken bytes or skipped tokens get this long.
MAX_PENDING_TOKENS = 32
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_BYTES = 256


class StreamDecoder:
    def __init__(self, decode: Callable[[List[int]], str]):
        self._decode = decode
        self._ids: List[int] = []
        self._read = 0
        self._prefix = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._decode(self._ids)
        pending = len(self._ids) - self._read
        if text.endswith(REPLACEMENT) and pending < MAX_PENDING_TOKENS:
            return ""
        if len(text) <= len(self._prefix) or not text.startswith(self._prefix):
            if pending < MAX_PENDING_TOKENS:
                return ""
        delta = text[len(self._prefix):]
        # The emitted tokens become the context of the next window.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix = self._decode(self._ids)
        return delta

    def finish(self) -> str:
        text = self._decode(self._ids)
        delta = text[len(self._prefix):] if text.startswith(self._prefix) else ""
        self._ids, self._read, self._prefix = [], 0, ""
        return delta


def check_stop_strings(stops: Sequence[str]) -> None:
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"`stop` has {len(stops)} strings, more than {MAX_STOP_STRINGS}")
    for i, s in enumerate(stops):
        if not s:
            raise invalid(f"`stop[{i}]` is empty")
        if len(s.encode()) > MAX_STOP_STRING_BYTES:
            raise invalid(f"`stop[{i}]` is {len(s.encode())} bytes long, more than {MAX_STOP_STRING_BYTES}")


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        check_stop_strings(stops)
        self._stops = list(stops)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that became final; sets `stopped` when a stop string completed."""
        if self.stopped:
            return ""
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class TextStream:
    """Detokenisation, then stop strings. Ids past the tokenizer's vocabulary have no text."""

    def __init__(self, decode: Callable[[List[int]], str], vocab_size: int, stops: Sequence[str]):
        self._decoder = StreamDecoder(decode)
        self._stops = StopMatcher(stops)
        self._vocab_size = vocab_size

    def push(self, token: int) -> Tuple[str, bool]:
        if token >= self._vocab_size:
            return "", False
        delta = self._decoder.push(token)
        if not delta:
            return "", False
        text = self._stops.push(delta)
        return text, self._stops.stopped

    def finish(self) -> str:
        text = self._stops.push(self._decoder.finish())
        if not self._stops.stopped:
            text += self._stops.flush()
        return text
