"""Validated LLM replies on disk (through the one atomic writer)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from rangelens.artifacts import write_text
from rangelens.explain.clients.base import Completion, Message


class ResponseCache:
    """Validated replies on disk, one JSON file per sha256 of the request: reruns are free and
    interrupted runs resume where they stopped. Failed replies are never written."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(identity: str, messages: Sequence[Message], options: str = "") -> str:
        payload = json.dumps(
            [identity, list(messages), options], sort_keys=True, ensure_ascii=False
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Completion.from_dict(data["reply"])
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: ask again
            return None

    def put(self, key: str, identity: str, reply: Completion) -> None:
        """Keep ``reply`` (atomically, without fsync: an entry a power cut loses is asked again)."""
        payload = json.dumps({"client": identity, "reply": reply.to_dict()})
        write_text(self._path(key), payload, durable=False)
