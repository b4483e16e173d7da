"""Per-sample member checksums: a `sums.json` member holding the CRC-32 of every other member of the sample.

The shard index's sha256 covers a whole shard, which the streaming reader cannot check before it has handed
out that shard's samples; a flipped bit in an mp4 mostly still decodes, to different frames. Each sample
therefore carries the CRC-32 of its members, written by `one4d shard` (and rewritten by `one4d encode-latents`,
which adds members), checked by the reader before decoding (a mismatch skips the sample like any corrupt one)
and by `one4d inspect-shards`. Samples of shards written before sums existed have none and are read as before.
"""
from __future__ import annotations

import json

from data_pipeline.decode import SampleError, crc32

MEMBER = "sums.json"


def with_sums(key: str, members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The sample's members (tar names `key.suffix`) followed by its sums.json (an old one is replaced)."""
    members = [(name, data) for name, data in members if name != f"{key}.{MEMBER}"]
    sums = {name.split(".", 1)[1]: crc32(data) for name, data in members}
    return members + [(f"{key}.{MEMBER}", json.dumps(sums, sort_keys=True).encode())]


def verify(raw: dict) -> None:
    """SampleError naming the first member whose bytes do not match the sample's sums.json (raw: suffix -> bytes,
    as the reader groups a sample); nothing to check when the sample has no sums.json."""
    if MEMBER not in raw:
        return
    try:
        sums = json.loads(raw[MEMBER].decode("utf-8"))
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except Exception as exc:
        raise SampleError(f"member {MEMBER} is not readable: {exc}") from None
    for suffix, want in sums.items():
        if suffix not in raw:
            raise SampleError(f"member {suffix} listed in {MEMBER} is missing")
        if crc32(raw[suffix]) != want:
            raise SampleError(f"member {suffix} is corrupt (its CRC-32 differs from {MEMBER}'s)")
