"""Z85 (ZeroMQ RFC 32) text encoding of binary keys, so key files and APIs stay printable."""

from __future__ import annotations

_ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}


def encode(data: bytes) -> str:
    """Encode bytes whose length is a multiple of 4."""
    if len(data) % 4:
        raise ValueError("z85 input length must be a multiple of 4")
    out = bytearray()
    for i in range(0, len(data), 4):
        value = int.from_bytes(data[i : i + 4], "big")
        chunk = bytearray(5)
        for j in range(4, -1, -1):
            value, chunk[j] = divmod(value, 85)
            chunk[j] = _ALPHABET[chunk[j]]
        out += chunk
    return out.decode("ascii")


def decode(text: str) -> bytes:
    """Decode Z85 text whose length is a multiple of 5; ValueError on anything else."""
    raw = text.encode("ascii", errors="strict") if isinstance(text, str) else bytes(text)
    if len(raw) % 5:
        raise ValueError("z85 text length must be a multiple of 5")
    out = bytearray()
    for i in range(0, len(raw), 5):
        value = 0
        for c in raw[i : i + 5]:
            digit = _DECODE.get(c)
            if digit is None:
                raise ValueError(f"invalid z85 character {chr(c)!r}")
            value = value * 85 + digit
        if value >= 1 << 32:
            raise ValueError("z85 group out of range")
        out += value.to_bytes(4, "big")
    return bytes(out)
