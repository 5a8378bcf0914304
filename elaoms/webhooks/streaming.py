"""Audio deliveries without holding them: the base64 `full_audio` string is decoded into a
file as it is read, and the rest of the envelope (a few kilobytes) is kept for parsing.

A streaming JSON parser (ijson) was not enough: it hands every string value over whole,
and `full_audio` is the one value that is tens of megabytes. So a small lexer walks the
bytes, knowing only where strings start and end (quotes and backslash escapes), with
`bytes.find`-style searches rather than a loop per byte. The value of every key named
`full_audio` is diverted to the decoder and replaced in the remainder by `AUDIO_MARKER`;
the remainder is then parsed like any other body, so the usual validation applies.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import BinaryIO, Protocol

AUDIO_KEY = b"full_audio"
AUDIO_MARKER = "elaoms:diverted-audio"
READ_SIZE = 1024 * 1024


class AudioSink(Protocol):
    def write(self, data: bytes) -> object: ...


@dataclass(slots=True)
class SplitBody:
    remainder: bytes  # the body with every full_audio value replaced by AUDIO_MARKER
    audio_values: int  # how many full_audio values were diverted
    audio_bytes: int  # decoded bytes written to the sink
    audio_error: str | None  # why the diverted base64 is not valid, if it is not
    too_large: bool  # the remainder passed `max_remainder` (and was not kept)


class _Base64Decoder:
    """Strict base64 (as `b64decode(validate=True)`), fed in pieces of any size."""

    def __init__(self, sink: AudioSink) -> None:
        self.sink = sink
        self.carry = b""
        self.written = 0
        self.error: str | None = None
        self.padded = False

    def feed(self, text: bytes) -> None:
        if self.error or not text:
            return
        if self.padded:  # strict decoding of each piece cannot see "QQ==" + "QQ=="
            self.error = "data.full_audio is not valid base64: Excess data after padding"
            return
        data = self.carry + text
        usable = len(data) - len(data) % 4
        self.carry = data[usable:]
        self._decode(data[:usable])

    def fail(self, reason: str) -> None:
        self.error = self.error or reason

    def close(self) -> None:
        if self.error is None and self.carry:
            self.error = "data.full_audio is not valid base64: Incorrect padding"

    def _decode(self, data: bytes) -> None:
        if not data:
            return
        try:
            decoded = binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error as error:
            self.error = f"data.full_audio is not valid base64: {error}"
            return
        self.padded = data.endswith(b"=")
        self.sink.write(decoded)
        self.written += len(decoded)


def _next_special(chunk: bytes, start: int) -> int:
    """Where the next quote or backslash is (len(chunk) if none): two memchr-speed finds,
    the second bounded by the first so that many short strings stay linear. (A regular
    expression character class ran at 20 MB/s.)"""
    quote = chunk.find(b'"', start)
    end = len(chunk) if quote < 0 else quote
    backslash = chunk.find(b"\\", start, end)
    return end if backslash < 0 else backslash


def split_audio(source: BinaryIO, sink: AudioSink, *, max_remainder: int) -> SplitBody:
    """Read `source` to its end; decode every `full_audio` string value into `sink`."""
    remainder = bytearray()
    state = "out"  # out | string | audio | after_key | after_colon
    escaped = False
    key = bytearray()  # the first bytes of the string being read (to recognise the key)
    key_exact = True
    diverted = 0
    decoder: _Base64Decoder | None = None
    audio_error: str | None = None
    audio_bytes = 0
    too_large = False

    while chunk := source.read(READ_SIZE):
        i, n = 0, len(chunk)
        while i < n:
            if state == "out":
                j = chunk.find(b'"', i)
                end = n if j < 0 else j + 1
                remainder += chunk[i:end]
                i = end
                if j >= 0:
                    state, key, key_exact = "string", bytearray(), True
            elif state in ("string", "audio"):
                if escaped:
                    escaped = False
                    if state == "audio":
                        assert decoder is not None
                        if chunk[i : i + 1] == b"/":  # JSON may escape "/" as "\/"
                            decoder.feed(b"/")
                        else:
                            decoder.fail("data.full_audio is not valid base64: escaped character")
                    else:
                        remainder += chunk[i : i + 1]
                        key_exact = False
                    i += 1
                    continue
                end = _next_special(chunk, i)
                if state == "audio":
                    assert decoder is not None
                    decoder.feed(chunk[i:end])
                else:
                    remainder += chunk[i:end]
                    if len(key) <= len(AUDIO_KEY):
                        key += chunk[i : min(end, i + len(AUDIO_KEY) + 1)]
                if end == n:
                    i = n
                    continue
                i = end + 1
                if chunk[end : end + 1] == b"\\":
                    escaped = True
                    if state == "string":
                        remainder += b"\\"
                    continue
                # The closing quote.
                if state == "audio":
                    assert decoder is not None
                    decoder.close()
                    audio_error = audio_error or decoder.error
                    audio_bytes += decoder.written
                    decoder = None
                    remainder += b'"'
                    state = "out"
                else:
                    remainder += b'"'
                    state = "after_key" if key_exact and bytes(key) == AUDIO_KEY else "out"
            elif state == "after_key":
                byte = chunk[i : i + 1]
                if byte in (b" ", b"\t", b"\r", b"\n"):
                    remainder += byte
                    i += 1
                elif byte == b":":
                    remainder += byte
                    i += 1
                    state = "after_colon"
                else:
                    state = "out"  # it was a value "full_audio", not the key
            else:  # after_colon
                byte = chunk[i : i + 1]
                if byte in (b" ", b"\t", b"\r", b"\n"):
                    remainder += byte
                    i += 1
                elif byte == b'"':
                    remainder += b'"' + AUDIO_MARKER.encode()
                    i += 1
                    diverted += 1
                    decoder = _Base64Decoder(sink)
                    state = "audio"
                else:
                    state = "out"  # not a string (null, a number): left to validation
        if len(remainder) > max_remainder:
            too_large = True
            remainder.clear()
            break
    if decoder is not None:  # the body ended inside the audio string: not JSON
        audio_error = audio_error or "data.full_audio is not a complete JSON string"
    return SplitBody(
        remainder=bytes(remainder),
        audio_values=diverted,
        audio_bytes=audio_bytes,
        audio_error=audio_error,
        too_large=too_large,
    )
