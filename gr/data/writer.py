"""Writing text-video shards: `{key}.mp4` + `{key}.json` samples in webdataset tar files."""

from __future__ import annotations

import json
import os
from typing import Any

import webdataset as wds


class VideoShardWriter:
    """Append (key, mp4 bytes, meta) samples to `{out_dir}/{prefix}-%06d.tar`, `max_per_shard` samples per tar.

    Shards are written under a temporary name and renamed when complete, so a crash never leaves a truncated tar
    under a final name.
    """

    def __init__(self, out_dir: str, prefix: str, max_per_shard: int = 64):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.max_per_shard = out_dir, prefix, max_per_shard
        self.shards: list[str] = []
        self.count = 0
        self._writer = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self.close()
        final = os.path.join(self.out_dir, f"{self.prefix}-{len(self.shards):06d}.tar")
        self.shards.append(final)
        self._writer = wds.TarWriter(final + ".tmp")
        self._in_shard = 0

    def write(self, key: str, mp4: bytes, meta: dict[str, Any]) -> None:
        if self._writer is None or self._in_shard >= self.max_per_shard:
            self._open_next()
        self._writer.write({"__key__": key, "mp4": mp4, "json": json.dumps(meta).encode()})
        self._in_shard += 1
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            os.replace(self.shards[-1] + ".tmp", self.shards[-1])
            self._writer = None

    @property
    def pattern(self) -> str:
        """Brace pattern covering every shard written, for `data.train_shards` / `data.val_shards`."""
        n = len(self.shards)
        if n == 0:
            return ""
        if n == 1:
            return self.shards[0]
        return os.path.join(self.out_dir, f"{self.prefix}-{{000000..{n - 1:06d}}}.tar")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
