"""Per-sample member checksums: a `sums.json` member holding the CRC-32 of every other member of the sample.

The shard index's sha256 covers a whole shard, which the streaming reader cannot check before it has handed
out that shard's samples; a flipped bit in an mp4 mostly still decodes, to different frames. Each sample
therefore carries the CRC-32 of its members, written by `one4d shard` (and rewritten by `one4d encode-latents`,
which adds members), checked by the reader before decoding (a mismatch skips the sample like any corrupt one)
and by `one4d inspect-shards`. Every sample has one (index.json sample_format 3), written last: a sample without
it, or without a member it lists, was cut short (a truncated shard, a damaged tar header) and is skipped.
"""
from __future__ import annotations

import json

from data_pipeline.decode import SampleError, crc32, member_problem, why

MEMBER = "sums.json"


def with_sums(key: str, members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The sample's members (tar names `key.suffix`) followed by its sums.json (an old one is replaced)."""
    members = [(name, data) for name, data in members if name != f"{key}.{MEMBER}"]
    sums = {name.split(".", 1)[1]: crc32(data) for name, data in members}
    return members + [(f"{key}.{MEMBER}", json.dumps(sums, sort_keys=True).encode())]


def read_sums(data: bytes) -> dict[str, int]:
    """The parsed sums.json (SampleError when it is not an object of integers)."""
    try:
        sums = json.loads(data.decode("utf-8"))
        if not isinstance(sums, dict) or not all(isinstance(v, int) for v in sums.values()):
            raise ValueError("not a JSON object of integers")
    except Exception as exc:
        raise SampleError(f"member {MEMBER} is not readable: {why(exc)}") from None
    return sums


def problems(sums: dict[str, int], crcs: dict[str, int]) -> str | None:
    """What is wrong with a sample whose members have CRC-32s `crcs` (sums.json excluded), or None."""
    missing = sorted(set(sums) - set(crcs))
    if missing:
        return f"members {missing} listed in {MEMBER} are missing"
    bad = sorted(k for k, want in sums.items() if crcs[k] != want)
    if bad:
        return f"members {bad} are corrupt (their CRC-32 differs from {MEMBER}'s)"
    unlisted = sorted(set(crcs) - set(sums))
    if unlisted:
        return f"members {unlisted} are not in {MEMBER} (added after the sample was written)"
    return None


def sample_problem(crcs: dict[str, int], sums: bytes | None) -> str | None:
    """What is wrong with a sample whose members other than sums.json have CRC-32s `crcs` and whose sums.json
    holds `sums` (None: it has none): a missing sums.json, members that do not match it, or members every
    sample has (decode.member_problem) missing; None when nothing is."""
    if sums is None:
        return f"no {MEMBER}: the sample is incomplete (a truncated shard or a damaged tar header?)"
    try:
        problem = problems(read_sums(sums), crcs)
    except SampleError as exc:
        problem = str(exc)
    return problem or member_problem(crcs)


def verify(raw: dict) -> None:
    """SampleError unless the sample has its sums.json, its members match it and none that every sample has is
    missing (raw: suffix -> bytes, as the reader groups a sample; keys starting with '__' are the reader's own)."""
    crcs = {k: crc32(v) for k, v in raw.items() if k != MEMBER and not k.startswith("__")}
    problem = sample_problem(crcs, raw.get(MEMBER))
    if problem:
        raise SampleError(problem)
