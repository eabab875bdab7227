"""Strict parsing of request values (protojson rules), free of any web framework."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from timeline.errors import InvalidParam, PayloadTooLarge, Unauthorized
from timeline.model import Conversation, Message
from timeline.settings import Settings

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
_INT_STRING = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True, slots=True)
class Limits:
    """The request limits of the settings, in the form validation needs them."""

    count_default: int
    count_max: int
    group_members_max: int
    message_max_bytes: int
    message_max_depth: int
    id_max_length: int
    fanout_max_bytes: int
    batch_max_messages: int = 100
    request_documents_max: int = 200_000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            count_default=settings.count_default,
            count_max=settings.count_max,
            group_members_max=settings.group_members_max,
            message_max_bytes=settings.message_max_bytes,
            message_max_depth=settings.message_max_depth,
            id_max_length=settings.id_max_length,
            fanout_max_bytes=settings.fanout_max_bytes,
            batch_max_messages=settings.batch_max_messages,
            request_documents_max=settings.request_documents_max,
        )


def check_bearer(token: str | None, authorization: str) -> None:
    """With an api_token set, `authorization` (the HTTP header, or gRPC's metadata of that
    name) must be `Bearer <token>`."""
    if not token:
        return
    scheme, _, given = authorization.partition(" ")
    # compare_digest takes as long whatever the first wrong byte: no timing oracle.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized("a valid bearer token is required")


def field(data: Mapping[str, Any], proto_name: str, json_name: str | None = None) -> Any:
    """A field by its proto name or its lowerCamelCase name; both at once is an error."""
    value = data.get(proto_name)
    if json_name is None or json_name == proto_name or json_name not in data:
        return value
    if proto_name in data:
        raise InvalidParam(f"{proto_name} and {json_name} are the same field; send one")
    return data[json_name]


def parse_id(value: Any, name: str, limits: Limits, *, routable: bool = True) -> str:
    """A user, member or group id: 1..id_max_length printable characters, no ':'.

    A routable id (one that names a timeline) can also be read back on a path route, so it
    holds no '/' and is not '.' or '..' (see _unroutable). client_msg_id, never in a path,
    is not routable.
    """
    if value is None or value == "":
        raise InvalidParam(f"{name} is required", field=name)
    if not isinstance(value, str):
        raise InvalidParam(f"{name} must be a string", field=name)
    if "\ufffd" in value:
        # What a URL's invalid UTF-8 decodes to: %FF and %FE would name the same id.
        raise InvalidParam(f"{name} is not valid UTF-8", field=name)
    if len(value) > limits.id_max_length:
        raise InvalidParam(f"{name} is longer than {limits.id_max_length} characters", field=name)
    if not value.isprintable():
        raise InvalidParam(f"{name} must hold printable characters only", field=name)
    if ":" in value:
        # ':' joins the two users of a one-to-one conversation id.
        raise InvalidParam(f"{name} must not contain ':'", field=name)
    if routable:
        _unroutable(value, name)
    return value


def _unroutable(value: str, name: str) -> None:
    """Refuse what no path route could name: the history routes take ids as path segments.

    '/' (even sent as %2F, which the server decodes before routing) splits the segment, and
    a segment '.' or '..' (or %2E%2E) is removed by browsers and curl before sending. Such an
    id could be written but its history never read, so it is refused like ':'.
    """
    if "/" in value:
        raise InvalidParam(f"{name} must not contain '/'", field=name)
    if value in _DOT_SEGMENTS:
        raise InvalidParam(f"{name} must not be '.' or '..'", field=name)


_DOT_SEGMENTS = frozenset({".", ".."})


def parse_device(value: Any, limits: Limits) -> str:
    """Extension: which of a member's devices asks, an id (not routable: never in a path);
    absent or empty: "" (the member as one device)."""
    if value is None or value == "":
        return ""
    return parse_id(value, "device", limits, routable=False)


def parse_conversation_kind(value: Any) -> Conversation:
    """A conversation's kind: "single" or "group"."""
    if value is None or value == "":
        raise InvalidParam("type is required (single or group)", field="type")
    if not isinstance(value, str):
        raise InvalidParam("type must be single or group", field="type")
    try:
        return Conversation(value)
    except ValueError:
        raise InvalidParam("type must be single or group", field="type") from None


def parse_members(value: Any, name: str, limits: Limits) -> list[str]:
    """A non-empty list of ids; duplicates collapse to the first, order is kept."""
    if value is None or value == []:
        raise InvalidParam(f"{name} must list at least one member", field=name)
    if not isinstance(value, list):
        raise InvalidParam(f"{name} must be a list of strings", field=name)
    if len(value) > limits.group_members_max:
        raise InvalidParam(
            f"{name} lists {len(value)} members; at most {limits.group_members_max} are allowed",
            field=name,
            limit=limits.group_members_max,
        )
    if _all_valid_ids(value, limits):
        return list(dict.fromkeys(value))
    # Something is wrong: find the first bad member, for a message that names it.
    return list(
        dict.fromkeys(parse_id(member, f"{name}[{i}]", limits) for i, member in enumerate(value))
    )


def _all_valid_ids(values: list[Any], limits: Limits) -> bool:
    """The rules of parse_id for a whole list at once, in C: a 10,000-member group is checked
    in well under a millisecond instead of ten."""
    if not all(type(v) is str for v in values):
        return False
    joined = "".join(values)
    return (
        joined.isprintable()
        and ":" not in joined
        and "/" not in joined
        and "\ufffd" not in joined
        and min(map(len, values)) > 0
        and max(map(len, values)) <= limits.id_max_length
        and "." not in values
        and ".." not in values
    )


def parse_int64(value: Any, name: str, default: int = 0, minimum: int = 0) -> int:
    """An int64 as protojson reads it: a JSON number or a string of digits."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidParam(f"{name} must be an integer", field=name)
    if isinstance(value, str):
        if not _INT_STRING.fullmatch(value.strip()):
            raise InvalidParam(f"{name} must be an integer", field=name)
        number = int(value)
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise InvalidParam(f"{name} must be an integer", field=name)
    if not INT64_MIN <= number <= INT64_MAX:
        raise InvalidParam(f"{name} is out of the int64 range", field=name)
    if number < minimum:
        raise InvalidParam(f"{name} must be at least {minimum}", field=name)
    return number


def parse_count(value: Any, name: str, limits: Limits) -> int:
    """How many entries to return: absent or 0 means the default; over the cap is an error."""
    count = parse_int64(value, name)
    if count == 0:
        return limits.count_default
    if count > limits.count_max:
        raise InvalidParam(
            f"{name} must be at most {limits.count_max}", field=name, limit=limits.count_max
        )
    return count


def _check_tree(value: Any, limits: Limits, name: str = "message") -> bool:
    """Walk a message: depth, integer range, keys BSON can store; iterative, no recursion.

    Returns True when a float of 2**63 or more was seen: orjson reads an integer literal
    beyond 64 bits as a float, so only the source text can tell which it was.
    """
    ambiguous = False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.message_max_depth:
            raise InvalidParam(
                f"{name} is nested deeper than {limits.message_max_depth} levels",
                field=name,
            )
        children = node.values() if isinstance(node, dict) else node
        if isinstance(node, dict):
            for key in node:
                if key.startswith("$"):
                    # MongoDB reads {"$ref", "$id"} back as a DBRef and gives other
                    # $-names operator meaning; refused here, on every store alike.
                    raise InvalidParam(
                        f"{name} keys must not start with '$' ({key[:32]!r})", field=name
                    )
                if "\x00" in key:
                    raise InvalidParam(f"{name} keys must not contain NUL", field=name)
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif isinstance(child, bool):
                continue
            elif isinstance(child, int):
                if not INT64_MIN <= child <= INT64_MAX:
                    raise InvalidParam(
                        f"{name} holds an integer out of the int64 range", field=name
                    )
            elif isinstance(child, float) and abs(child) >= 2**63:
                ambiguous = True
    return ambiguous


def parse_message(
    value: Any,
    limits: Limits,
    source: Callable[[], Any] | None = None,
    name: str = "message",
) -> Message:
    """The client's message: a JSON object, or a string holding one (go-timeline's form).

    `source` reads the object form again with Python's json, whose integers are exact; it
    is called only in the rare case where orjson may have turned a huge integer literal
    into a float (the string form is read again from the string itself).
    """
    if value is None or value == "":
        raise InvalidParam(f"{name} is required", field=name)
    if isinstance(value, str):
        text = value
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidParam(f"{name} is not valid JSON: {exc}", field=name) from exc

        def source() -> Any:
            return json.loads(text)

    else:
        document = value
    if not isinstance(document, dict):
        raise InvalidParam(f"{name} must be a JSON object", field=name)
    # The depth is checked before `source` runs, so the re-read cannot recurse too far.
    if _check_tree(document, limits, name) and source is not None:
        _check_tree(source(), limits, name)  # raises if the float was an oversized integer
    encoded = orjson.dumps(document)
    if len(encoded) > limits.message_max_bytes:
        raise PayloadTooLarge(
            f"{name} is larger than {limits.message_max_bytes} bytes (compact JSON)",
            limit=limits.message_max_bytes,
        )
    compact = encoded.decode()
    if isinstance(value, str):
        # The object form was checked with the body; the text form is checked here. Its depth
        # is within message_max_depth already, so Python's json cannot recurse too far.
        reject_duplicate_keys(value, compact, name)
    return Message(document=document, json=compact)


def check_batch(messages: int, limits: Limits) -> None:
    """A batch (`messages`) holds at most batch_max_messages."""
    if messages > limits.batch_max_messages:
        raise InvalidParam(
            f"messages holds {messages}; at most {limits.batch_max_messages} are allowed",
            field="messages",
            limit=limits.batch_max_messages,
        )


def check_documents(recipients: int, messages: int, limits: Limits) -> None:
    """Rows, not only bytes: the sync copies one request may write, recipients x messages.

    Checked before anything is allocated or stored; the caller splits the request."""
    copies = recipients * messages
    if copies > limits.request_documents_max:
        raise PayloadTooLarge(
            f"{recipients} recipients x {messages} messages make {copies} sync copies, over "
            f"the {limits.request_documents_max} one request may write; split the request",
            limit=limits.request_documents_max,
        )


def check_fan_out(members: list[str], messages: list[Message], limits: Limits) -> None:
    """What one request may write: every member's copy and the history's, in bytes."""
    size = sum(len(message.json) for message in messages)
    if (len(members) + 1) * size > limits.fanout_max_bytes:
        raise PayloadTooLarge(
            f"{len(members) + 1} copies of {size} bytes of messages exceed "
            f"{limits.fanout_max_bytes} bytes; send smaller messages (or references to them)",
            limit=limits.fanout_max_bytes,
        )


def decode_body(data: bytes) -> dict[str, Any]:
    """A request body: a JSON object, whatever the Content-Type said; empty reads as {}."""
    if not data.strip():
        return {}
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidParam(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidParam("request body must be a JSON object")
    try:
        canonical: bytes | None = orjson.dumps(body)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes: no fast path
        canonical = None
    reject_duplicate_keys(data, canonical)
    return body


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _pairs_once(pairs: list[tuple[str, Any]]) -> None:
    """object_pairs_hook: raise on an object that names a key twice; build nothing."""
    if len(pairs) > 1 and len(dict(pairs)) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)


# Built once: json.loads with a hook builds a decoder on every call. Shared across threads
# as json.loads' own default decoder is.
_PAIRS_ONCE = json.JSONDecoder(object_pairs_hook=_pairs_once)


def reject_duplicate_keys(
    text: str | bytes, canonical: str | bytes | None, name: str | None = None
) -> None:
    """Refuse JSON text (already read by orjson) in which an object repeats a key.

    go's protojson refuses a repeated field; orjson keeps the last in silence, so a gateway
    that checked the first "from" would be bypassed. When the text is exactly `canonical`,
    what orjson writes back for what it read, it repeats nothing (orjson never writes a key
    twice): compact JSON, as browsers and most clients send it, costs that comparison alone.
    Other text is read again by Python's json, with a hook that sees every object's pairs.
    `name` is the message field the text is, None for the request body.
    """
    if canonical is not None:
        # Compared as given (bytes for a body, text for a message): no copy to convert.
        stripped = text.strip(b" \t\r\n") if isinstance(text, bytes) else text.strip(" \t\r\n")
        if canonical == stripped:
            return
    if isinstance(text, bytes):
        text = text.decode()  # orjson has read it: valid UTF-8
    where = "request body" if name is None else name
    try:
        _PAIRS_ONCE.decode(text)
    except _RepeatedKey as exc:
        key = exc.key if len(exc.key) <= 64 else exc.key[:64] + "..."
        metadata = {"key": key} if name is None else {"field": name, "key": key}
        raise InvalidParam(f"{where} repeats the key {key!r} in one object", **metadata) from None
    except RecursionError as exc:  # an unknown field nested beyond any message's depth
        raise InvalidParam(f"{where} is nested too deeply") from exc
    except ValueError as exc:  # orjson accepted it; kept for safety
        raise InvalidParam(f"{where} is not valid JSON: {exc}") from exc


def reread_message(data: bytes, key: str, index: int | None = None) -> Any:
    """A message of the body again, integers exact; the rare path of parse_message's
    `source`: `body[key]`, or `body[key][index]` in a batch."""
    try:
        body = json.loads(data)
    except RecursionError as exc:  # an unknown field nested far deeper than any message may be
        raise InvalidParam("request body is nested too deeply") from exc
    value = body.get(key) if isinstance(body, dict) else None
    if index is not None:
        value = value[index] if isinstance(value, list) and index < len(value) else None
    return value
