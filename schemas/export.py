"""Export a JSON Schema file per wire message (`schemas/json/*.json`) for non-Python peers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from . import api, bookings, discovery, events, openai, worker

MESSAGES: dict[str, Any] = {
    "RouterEvent": events.RouterEvent,
    "RouterEventBatch": list[events.RouterEvent],
    "WorkerRecord": discovery.WorkerRecord,
    "LoadReport": discovery.LoadReport,
    "BookingEvent": bookings.BookingEvent,
    "MatchRequest": api.MatchRequest,
    "MatchReply": api.MatchReply,
    "DumpRequest": api.DumpRequest,
    "DumpReply": api.DumpReply,
    "SelectRequest": api.SelectRequest,
    "SelectReply": api.SelectReply,
    "StateRequest": api.StateRequest,
    "StateReply": api.StateReply,
    "EppQueryRequest": api.EppQueryRequest,
    "EppQueryReply": api.EppQueryReply,
    "EppBookRequest": api.EppBookRequest,
    "CleanupRequest": api.CleanupRequest,
    "CleanupReply": api.CleanupReply,
    "EppQueryBody": openai.OpenAiBody,
    "ErrorReply": api.ErrorReply,
    "GenerateRequest": worker.GenerateRequest,
    "GenerateProgress": worker.GenerateProgress,
}

JSON_DIR = Path(__file__).parent / "json"


def render_all() -> dict[str, str]:
    """File name → JSON text, deterministic so CI can diff it against the committed files."""
    out = {}
    for name, type_ in MESSAGES.items():
        schema = msgspec.json.schema(type_)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = name
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in render_all().items():
        path = directory / file_name
        path.write_text(text)
        written.append(path)
    return written


def stale_files(directory: Path = JSON_DIR) -> list[str]:
    """Names of schema files that are missing or differ from what the code would export."""
    stale = []
    for file_name, text in render_all().items():
        path = directory / file_name
        if not path.exists() or path.read_text() != text:
            stale.append(file_name)
    return stale
