"""The wire contract (docs/protocol.md) in executable form: msgspec types, codecs, hashing, names."""

from .api import (
    ERROR_HTTP_STATUS,
    CleanupReply,
    CleanupRequest,
    DumpReply,
    DumpRequest,
    EppPod,
    EppQueryReply,
    EppQueryRequest,
    ErrorBody,
    ErrorReply,
    MatchReply,
    MatchRequest,
    Overrides,
    RoutingConstraints,
    SelectReply,
    SelectRequest,
    StateReply,
    StateRequest,
    Target,
    WorkerLoad,
    WorkerScore,
)
from .bookings import BookingAdd, BookingEvent, BookingFree, BookingMove, BookingPrefillComplete, booking_msg_id
from .codec import (
    MSGPACK,
    RemoteError,
    SchemaError,
    convert,
    decode,
    decode_reply,
    encode,
    encode_json,
    encode_msgpack,
    error_reply,
)
from .discovery import LoadReport, WorkerRecord, worker_key
from .events import (
    CLEARED,
    EventData,
    KvCacheEvent,
    RemoveData,
    RouterEvent,
    StoreData,
    StoredBlock,
    cleared_event,
    kv_msg_id,
    removed_event,
    stored_event,
)
from .subjects import Names

__all__ = [name for name in dir() if not name.startswith("_")]
