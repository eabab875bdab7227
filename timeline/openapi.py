"""The OpenAPI 3 document of the service, as the routes really behave.

Kept true by tests: its paths are checked against the routes the app serves, and
schemathesis drives every operation from it and validates each reply against it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from timeline import __version__

INT64_MAX = 2**63 - 1

_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": "^(?!\\.\\.?$)[^:/\\x00-\\x1f\\x7f]+$",
    "description": "1 to 128 printable characters, no ':' or '/', not '.' or '..' "
    "(every id written can be read back on the path routes).",
}
_INT64_OUT = {"type": "string", "pattern": "^-?[0-9]+$", "description": "An int64, as a string."}
_INT64_IN = {
    "oneOf": [
        {"type": "string", "pattern": "^[0-9]+$"},
        {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
    ],
    "description": "An int64, as a string or a number.",
}
_MESSAGE = {
    "oneOf": [
        {"type": "string", "description": "A JSON object, as text (go-timeline's form)."},
        {"type": "object", "description": "Extension: the JSON object itself."},
    ],
    "description": "At most 64 KiB compact, 64 levels deep, no key starting with '$', no "
    "key repeated in an object.",
}
_CLIENT_MSG_ID = {
    **_ID,
    "pattern": "^[^:\\x00-\\x1f\\x7f]+$",
    "description": "Extension: makes retries idempotent. 1 to 128 printable characters, "
    "no ':' ('/', '.' and '..' are allowed: it is never in a path).",
}
_MESSAGES = {
    "type": "array",
    "items": _MESSAGE,
    "minItems": 1,
    "maxItems": 100,
    "description": "Extension, instead of message: a batch, stored in order, contiguous. "
    "Recipients x messages is at most 200,000 sync copies (413 beyond).",
}
_ONE_OF_MESSAGE = {"anyOf": [{"required": ["message"]}, {"required": ["messages"]}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid parameter (TIMELINE_INVALID_PARAM): a malformed or missing field, a "
        "key repeated in a JSON object, a query %-sequence that is not UTF-8; nothing was "
        "stored.",
        401: "Missing or wrong bearer token, when one is configured.",
        404: "No such route (TIMELINE_NOT_FOUND).",
        409: "client_msg_id already names another message (TIMELINE_CLIENT_MSG_ID_REUSED).",
        413: "Body, message or fan-out bytes, or sync copies (recipients x messages, "
        "request_documents_max: 200,000), over its limit (TIMELINE_PAYLOAD_TOO_LARGE; "
        "metadata.limit); nothing was stored.",
        503: "Redis or the store unavailable, or copies not stored (retry; Retry-After).",
    }
    return {str(code): _json(_ref("Error"), reasons[code]) for code in codes}


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> Any:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


_PAGE = [
    _query("last_read", _INT64_IN, "Return entries after this sequence (also: lastRead)."),
    _query("lastRead", _INT64_IN, "The same as last_read; give one of the two."),
    _query(
        "count",
        {"type": "integer", "minimum": 0, "maximum": 1000},
        "At most this many entries; absent or 0: 100.",
    ),
]
_WAIT = _query(
    "wait_ms",
    _INT64_IN,
    "Extension: when nothing after last_read is readable, hold the request until something "
    "is (then the page) or this many milliseconds pass (then the empty page); clamped to "
    "sync_wait_max_ms (30,000). Absent or 0: answer at once.",
)
_DEVICE = {
    **_ID,
    "pattern": "^[^:\\x00-\\x1f\\x7f]+$",
    "description": "Extension: which of the member's devices asks (1 to 128 printable "
    "characters, no ':'). Absent: the member as one device.",
}
_BACKWARD = [
    _query(
        "direction",
        {"type": "string", "enum": ["forward", "backward"]},
        "Extension: backward pages from the newest down, newest first (default forward).",
    ),
    _query("before", _INT64_IN, "Backward only: entries below this sequence; absent or 0: all."),
]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["code", "reason", "message", "metadata"],
        "properties": {
            "code": {"type": "integer"},
            "reason": {"type": "string", "pattern": "^TIMELINE_"},
            "message": {"type": "string"},
            "metadata": {"type": "object"},
        },
    },
    "SendRequest": {
        "type": "object",
        "required": ["from", "to"],
        "allOf": [_ONE_OF_MESSAGE],
        "properties": {
            "from": _ID,
            "to": _ID,
            "message": _MESSAGE,
            "messages": _MESSAGES,
            "client_msg_id": _CLIENT_MSG_ID,
            "clientMsgId": _CLIENT_MSG_ID,
        },
    },
    "SendReply": {
        "type": "object",
        "required": ["sequence"],
        "properties": {
            "sequence": _INT64_OUT,
            "sequences": {
                "type": "array",
                "items": _INT64_OUT,
                "description": "Extension, for a batch: all of the receiver's sequences.",
            },
        },
    },
    "SendGroupRequest": {
        "type": "object",
        "allOf": [
            {"anyOf": [{"required": ["group_name"]}, {"required": ["groupName"]}]},
            {"anyOf": [{"required": ["group_members"]}, {"required": ["groupMembers"]}]},
            _ONE_OF_MESSAGE,
        ],
        "properties": {
            "group_name": _ID,
            "groupName": _ID,
            "group_members": {"type": "array", "items": _ID, "minItems": 1, "maxItems": 10000},
            "groupMembers": {"type": "array", "items": _ID, "minItems": 1, "maxItems": 10000},
            "message": _MESSAGE,
            "messages": _MESSAGES,
            "client_msg_id": _CLIENT_MSG_ID,
            "clientMsgId": _CLIENT_MSG_ID,
            "from": {
                **_ID,
                "description": "Extension: the sender. Its read position in the group moves to "
                "the message, and its own messages are never unread to it. Without it a group "
                "message is unread for every member.",
            },
        },
    },
    "SendGroupReply": {
        "type": "object",
        "required": ["failedMembers"],
        "properties": {"failedMembers": {"type": "array", "items": {"type": "string"}}},
    },
    "Entry": {
        "type": "object",
        "required": ["sequence", "message"],
        "properties": {
            "sequence": _INT64_OUT,
            "message": {"type": "string", "description": "The message's JSON object, as text."},
            "timestamp": {
                "type": "string",
                "pattern": "^$|^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z$",
                "description": "Extension: when it was stored (RFC 3339, UTC); empty if unknown.",
            },
        },
    },
    "SyncEntry": {
        "description": "An Entry, with what it records of its conversation.",
        "allOf": [_ref("Entry")],
        "properties": {
            "type": {
                "type": "string",
                "enum": ["single", "group"],
                "description": "Extension: the message's conversation (absent on entries "
                "stored before this version).",
            },
            "conversation": {
                "type": "string",
                "description": "Extension: the conversation as this member names it: the other "
                "user, or the group.",
            },
            "conversationSeq": {
                **_INT64_OUT,
                "description": "Extension: the message's sequence in the conversation's history. "
                "Sorted by it, a conversation's entries read as its history does, on every "
                "topology (the sync timeline itself is in delivery order).",
            },
        },
    },
    "ReadRequest": {
        "type": "object",
        "required": ["member", "type", "conversation", "seq"],
        "properties": {
            "member": _ID,
            "type": {"type": "string", "enum": ["single", "group"]},
            "conversation": {
                **_ID,
                "description": "single: the other user; group: the group's name.",
            },
            "seq": _INT64_IN,
        },
    },
    "ReadReply": {
        "type": "object",
        "required": ["readSeq", "unread"],
        "properties": {
            "readSeq": {
                **_INT64_OUT,
                "description": "The position now: never lower than before, never above the "
                "conversation's latest message.",
            },
            "unread": {"type": "integer", "minimum": 0},
        },
    },
    "Conversation": {
        "type": "object",
        "required": ["type", "conversation", "latestSeq", "readSeq", "unread", "lastMessage"],
        "properties": {
            "type": {"type": "string", "enum": ["single", "group"]},
            "conversation": {"type": "string"},
            "latestSeq": _INT64_OUT,
            "readSeq": _INT64_OUT,
            "unread": {
                "type": "integer",
                "minimum": 0,
                "description": "Messages of the history after readSeq, less sequences that "
                "hold none; the member's own messages are never among them.",
            },
            "lastMessage": {"nullable": True, "allOf": [_ref("Entry")]},
        },
    },
    "ConversationsReply": {
        "type": "object",
        "required": ["conversations", "next"],
        "properties": {
            "conversations": {"type": "array", "items": _ref("Conversation")},
            "next": {
                "type": "string",
                "description": "`before` of the next page; empty at the end.",
            },
        },
    },
    "DevicesReply": {
        "type": "object",
        "required": ["devices"],
        "properties": {
            "devices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["device", "position", "lastSeen"],
                    "properties": {
                        "device": {"type": "string"},
                        "position": _INT64_OUT,
                        "lastSeen": {"type": "string"},
                    },
                },
            }
        },
    },
    "AckRequest": {
        "type": "object",
        "required": ["member", "seq"],
        "properties": {"member": _ID, "seq": _INT64_IN, "device": _DEVICE},
    },
    "AckReply": {
        "type": "object",
        "required": ["minSeq"],
        "properties": {"minSeq": _INT64_OUT},
    },
    "SyncReply": {
        "type": "object",
        "required": ["latestSeq", "entrySetLastSeq", "entrySet", "minSeq"],
        "properties": {
            "latestSeq": _INT64_OUT,
            "entrySetLastSeq": _INT64_OUT,
            "entrySet": {"type": "array", "items": _ref("SyncEntry")},
            "minSeq": {
                **_INT64_OUT,
                "description": "Extension: the lowest sequence still returnable; a client "
                "with last_read + 1 < minSeq missed entries (acked or expired): read history.",
            },
        },
    },
    "HistoryReply": {
        "type": "object",
        "required": ["entrySet"],
        "properties": {
            "entrySet": {"type": "array", "items": _ref("Entry")},
            "nextBefore": {
                **_INT64_OUT,
                "description": "Backward only: `before` of the next (older) page; 0: none.",
            },
        },
    },
}


@cache
def openapi_document() -> dict[str, Any]:
    """The whole document; built once."""
    history = {
        "200": _json(_ref("HistoryReply"), "Entries with seq > last_read, ascending."),
        **_errors(400, 401, 404, 503),
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "timeline",
            "version": __version__,
            "description": "Message sync (timeline) service, wire-compatible with go-timeline. "
            "int64 values are strings in replies; requests take either field spelling.",
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/timeline/send": {
                "post": {
                    "summary": "Send a one-to-one message",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("SendRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("SendReply"), "The receiver's sync sequence."),
                        **_errors(400, 401, 409, 413, 503),
                    },
                }
            },
            "/timeline/sendGroup": {
                "post": {
                    "summary": "Send a group message to the listed members",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("SendGroupRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("SendGroupReply"), "Members without a copy."),
                        **_errors(400, 401, 409, 413, 503),
                    },
                }
            },
            "/timeline/ack": {
                "post": {
                    "summary": "Extension: release a member's sync entries up to seq",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("AckRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("AckReply"), "The sync timeline's new minSeq."),
                        **_errors(400, 401, 413, 503),
                    },
                }
            },
            "/timeline/sync": {
                "get": {
                    "summary": "Pull a member's sync (offline) timeline",
                    "parameters": [
                        _query("member", _ID, "The member whose timeline to read.", True),
                        *_PAGE,
                        _WAIT,
                        _query(
                            "device",
                            _DEVICE,
                            "Extension: the device syncing. Once seen, the member's entries are "
                            "released only below every device's ack (see ack).",
                        ),
                    ],
                    "responses": {
                        "200": _json(_ref("SyncReply"), "Entries with seq > last_read."),
                        **_errors(400, 401, 503),
                    },
                }
            },
            "/timeline/history/single/{from}/{to}": {
                "get": {
                    "summary": "History of a one-to-one conversation (either order)",
                    "parameters": [_path("from"), _path("to"), *_PAGE, _WAIT, *_BACKWARD],
                    "responses": history,
                }
            },
            "/timeline/history/group/{group}": {
                "get": {
                    "summary": "History of a group conversation",
                    "parameters": [_path("group"), *_PAGE, _WAIT, *_BACKWARD],
                    "responses": history,
                }
            },
            "/timeline/read": {
                "post": {
                    "summary": "Extension: the member has read a conversation up to seq",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ReadRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("ReadReply"), "The read position and unread count."),
                        **_errors(400, 401, 413, 503),
                    },
                }
            },
            "/timeline/conversations": {
                "get": {
                    "summary": "Extension: the member's conversations, most recent first",
                    "parameters": [
                        _query("member", _ID, "Whose conversations.", True),
                        _query(
                            "count",
                            {"type": "integer", "minimum": 0, "maximum": 1000},
                            "At most this many; absent or 0: 100.",
                        ),
                        _query(
                            "before",
                            {"type": "string"},
                            "The `next` of the previous page (an opaque cursor).",
                        ),
                    ],
                    "responses": {
                        "200": _json(_ref("ConversationsReply"), "A page of the list."),
                        **_errors(400, 401, 503),
                    },
                }
            },
            "/timeline/devices": {
                "get": {
                    "summary": "Extension: the member's devices and their acked positions",
                    "parameters": [_query("member", _ID, "Whose devices.", True)],
                    "responses": {
                        "200": _json(_ref("DevicesReply"), "The devices, by name."),
                        **_errors(400, 401, 503),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process answers",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: Redis and the store answer",
                    "description": (
                        "for=writes (the default): also what gates writes (MongoDB's unique "
                        "indexes) is built. for=reads: reads are served, also while indexes "
                        "build. A problem only an operator can solve is named in `problem`."
                    ),
                    "security": [],
                    "parameters": [
                        {
                            "name": "for",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["writes", "reads"]},
                        }
                    ],
                    "responses": {
                        "200": _json({"type": "object"}, "Ready."),
                        **_errors(400, 503),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.")},
                }
            },
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
