"""timeline.v1.Timeline: each method parses and validates its request with the HTTP API's rules
(timeline.validation, in the same order, so a request refused over HTTP is refused here
with the same reason, message and metadata), calls the same service method and builds
the reply. Nothing more: calls.py does the rest, waiting.py holds the calls that wait for
entries (wait_ms, Subscribe)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from functools import partial

import grpc
from google.protobuf import timestamp_pb2

from timeline.errors import InvalidParam, Unavailable
from timeline.model import Entry, Kind, Message, Timeline, conversation_id
from timeline.rpc.calls import Calls, Context
from timeline.rpc.v1 import timeline_pb2 as pb
from timeline.rpc.v1 import timeline_pb2_grpc
from timeline.rpc.waiting import Holds
from timeline.service import TimelineService
from timeline.service.conversations import parse_cursor
from timeline.store import ConversationState, Device
from timeline.validation import (
    Limits,
    check_batch,
    check_documents,
    check_fan_out,
    parse_conversation_kind,
    parse_count,
    parse_device,
    parse_id,
    parse_int64,
    parse_members,
    parse_message,
)

#: proto3's int32, which `unread` is (a number over HTTP, as protojson writes an int32).
INT32_MAX = 2**31 - 1


def entries(found: Sequence[Entry]) -> list[pb.TimelineEntry]:
    """Entries as TimelineEntry; `timestamp` is left unset where the store does not know it."""
    out = []
    for entry in found:
        item = pb.TimelineEntry(sequence=entry.seq, message=entry.message)
        set_timestamp(item.timestamp, entry.created_at_ms)
        out.append(item)
    return out


def sync_entries(found: Sequence[Entry]) -> list[pb.TimelineEntry]:
    """Sync entries, each with its conversation (extension) when its copy recorded it, as
    api.py's _sync_entries has them."""
    out = entries(found)
    for entry, item in zip(found, out, strict=True):
        if entry.conv_kind:
            item.type = entry.conv_kind
            item.conversation = entry.conv
            item.conversation_seq = entry.conv_seq
    return out


def set_timestamp(value: timestamp_pb2.Timestamp, ms: int) -> None:
    """`value` set to `ms` since the epoch; left unset when ms is 0 (unknown)."""
    if ms > 0:
        seconds, millis = divmod(ms, 1000)
        value.seconds = seconds
        value.nanos = millis * 1_000_000


def timestamp_ms(value: timestamp_pb2.Timestamp) -> int:
    """A TimelineEntry's timestamp back in milliseconds since the epoch (0: unset)."""
    return value.seconds * 1000 + value.nanos // 1_000_000


class TimelineServicer:
    """The methods of timeline.v1.Timeline, registered by add_to_server."""

    def __init__(self, limits: Limits, calls: Calls, holds: Holds) -> None:
        self.limits = limits
        self.holds = holds
        # The names protoc's generated registration looks for, each wrapped by `calls`.
        self.Send = calls.method("Send", self._send, writes=True)
        self.SendGroup = calls.method("SendGroup", self._send_group, writes=True)
        self.GetSyncMessage = calls.method("GetSyncMessage", self._sync)
        self.GetSingleHistoryMessage = calls.method("GetSingleHistoryMessage", self._single)
        self.GetGroupHistoryMessage = calls.method("GetGroupHistoryMessage", self._group)
        self.Ack = calls.method("Ack", self._ack)
        self.Subscribe = calls.stream("Subscribe", self._subscribe)
        self.MarkRead = calls.method("MarkRead", self._mark_read)
        self.ListConversations = calls.method("ListConversations", self._conversations)
        self.ListDevices = calls.method("ListDevices", self._devices)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        timeline_pb2_grpc.add_TimelineServicer_to_server(self, server)

    # --- writes ------------------------------------------------------------------------

    def _messages(self, message: str, batch: Sequence[str]) -> tuple[list[Message], bool]:
        """`message`, or extension `messages` (a batch); and whether it is a batch. proto3
        cannot tell an empty string or list from an absent one: both are absent here."""
        limits = self.limits
        if not batch:
            return [parse_message(message, limits)], False
        if message:
            raise InvalidParam("send either message or messages, not both")
        check_batch(len(batch), limits)
        return [
            parse_message(value, limits, name=f"messages[{i}]") for i, value in enumerate(batch)
        ], True

    def _client_msg_id(self, value: str) -> str | None:
        """Extension: the sender's id for this message, making retries idempotent."""
        if not value:
            return None
        return parse_id(value, "client_msg_id", self.limits, routable=False)

    def _send(
        self, request: pb.SendMessageRequest, context: Context, service: TimelineService
    ) -> pb.SendMessageReply:
        limits = self.limits
        sender = parse_id(getattr(request, "from"), "from", limits)
        receiver = parse_id(request.to, "to", limits)
        messages, batch = self._messages(request.message, request.messages)
        # The receiver's copy and the sender's (one when they are the same user).
        check_documents(1 if sender == receiver else 2, len(messages), limits)
        client_msg_id = self._client_msg_id(request.client_msg_id)
        sequences = service.send(sender, receiver, messages, client_msg_id)
        reply = pb.SendMessageReply(sequence=sequences[-1])
        if batch:
            reply.sequences.extend(sequences)
        return reply

    def _send_group(
        self, request: pb.SendGroupRequest, context: Context, service: TimelineService
    ) -> pb.SendGroupReply:
        limits = self.limits
        group = parse_id(request.group_name, "group_name", limits)
        members = parse_members(list(request.group_members), "group_members", limits)
        messages, _ = self._messages(request.message, request.messages)
        check_documents(len(members), len(messages), limits)
        check_fan_out(members, messages, limits)
        client_msg_id = self._client_msg_id(request.client_msg_id)
        # Extension: the sender, whose read position moves to the message (empty: none,
        # go-timeline's way; the message is then unread for every member).
        sender = getattr(request, "from")
        sender = parse_id(sender, "from", limits) if sender else ""
        failed = service.send_group(group, members, messages, client_msg_id, sender)
        return pb.SendGroupReply(failed_members=failed)

    def _ack(
        self, request: pb.AckRequest, context: Context, service: TimelineService
    ) -> pb.AckReply:
        member = parse_id(request.member, "member", self.limits)
        if not request.HasField("seq"):
            raise InvalidParam("seq is required", field="seq")
        seq = parse_int64(request.seq, "seq")
        device = parse_device(request.device, self.limits)
        return pb.AckReply(min_seq=service.ack(member, seq, device))

    def _mark_read(
        self, request: pb.MarkReadRequest, context: Context, service: TimelineService
    ) -> pb.MarkReadReply:
        """Extension: the member has read a conversation up to `seq`."""
        limits = self.limits
        member = parse_id(request.member, "member", limits)
        kind = parse_conversation_kind(request.type)
        name = parse_id(request.conversation, "conversation", limits)
        if not request.HasField("seq"):
            raise InvalidParam("seq is required", field="seq")
        seq = parse_int64(request.seq, "seq")
        state = service.read(member, kind, name, seq)
        return pb.MarkReadReply(read_seq=state.read, unread=_int32(state.unread))

    # --- reads -------------------------------------------------------------------------

    async def _sync(
        self, request: pb.SyncMessageRequest, context: Context, service: TimelineService
    ) -> pb.SyncMessageReply:
        limits = self.limits
        member = parse_id(request.member, "member", limits)
        last_read = parse_int64(request.last_read, "last_read")
        count = parse_count(request.count, "count", limits)
        wait_ms = parse_int64(request.wait_ms, "wait_ms")
        device = parse_device(request.device, self.limits)
        return await self.holds.read(
            context,
            Timeline(Kind.SYNC, member),
            wait_ms,
            partial(self._sync_page, service, member, last_read, count, device),
            _has_entries,
            # Nothing allocated past last_read: only a write, which publishes, changes it.
            lambda page: page.latest_seq <= last_read,
        )

    @staticmethod
    def _sync_page(
        service: TimelineService, member: str, last_read: int, count: int, device: str = ""
    ) -> pb.SyncMessageReply:
        result = service.sync(member, last_read, count, device)
        return pb.SyncMessageReply(
            latest_seq=result.latest_seq,
            entry_set_last_seq=result.entries[-1].seq if result.entries else 0,
            entry_set=sync_entries(result.entries),
            min_seq=result.min_seq,
        )

    def _conversations(
        self, request: pb.ListConversationsRequest, context: Context, service: TimelineService
    ) -> pb.ListConversationsReply:
        """Extension: the member's conversations, most recent activity first."""
        limits = self.limits
        member = parse_id(request.member, "member", limits)
        count = parse_count(request.count, "count", limits)
        cursor = parse_cursor(request.before) if request.before else None
        page = service.conversation_list(member, count, cursor)
        return pb.ListConversationsReply(
            conversations=[_conversation(state) for state in page.conversations],
            next=page.next,
        )

    def _devices(
        self, request: pb.ListDevicesRequest, context: Context, service: TimelineService
    ) -> pb.ListDevicesReply:
        """Extension: the member's devices, each one's acked position and when it was seen."""
        member = parse_id(request.member, "member", self.limits)
        return pb.ListDevicesReply(devices=[_device(d) for d in service.devices(member)])

    async def _subscribe(
        self, request: pb.SubscribeRequest, context: Context, service: TimelineService
    ) -> AsyncIterator[pb.SyncMessageReply]:
        """Each sync page after last_read once it has entries, the next from its last one.
        A page is read when a wake-up says the timeline has entries, and at least every
        sync_wait_max_ms (a wake-up lost with Redis, a hole that is never written and that
        the service steps over once its gap grace has passed). One page at a time: the
        next is read once grpc has handed this one to the transport, which it does while
        the client reads (HTTP/2 flow control); so a client that stops reading stops the
        stream, and the server holds at most a page and the connection's window for it."""
        limits = self.limits
        member = parse_id(request.member, "member", limits)
        last_read = parse_int64(request.last_read, "last_read")
        device = parse_device(request.device, limits)
        timeline = Timeline(Kind.SYNC, member)
        holds = self.holds
        round_s = holds.wait_max_ms / 1000
        async with holds.hold(slot=True) as hold:
            while True:
                read = partial(
                    self._sync_page, service, member, last_read, limits.count_default, device
                )
                page = await hold.until(timeline, read, _has_entries, round_s)
                if page.entry_set:
                    yield page
                    last_read = page.entry_set_last_seq
                if hold.ended:
                    break
        if holds.stopping and not context.done():
            raise Unavailable(
                "the server is stopping: subscribe again with last_read = the last sequence "
                "received"
            )

    async def _single(
        self,
        request: pb.GetSingleHistoryMessageRequest,
        context: Context,
        service: TimelineService,
    ) -> pb.GetSingleHistoryMessageReply:
        a = parse_id(getattr(request, "from"), "from", self.limits)
        b = parse_id(request.to, "to", self.limits)
        found, next_before = await self._history(service, conversation_id(a, b), request, context)
        return pb.GetSingleHistoryMessageReply(entry_set=found, next_before=next_before)

    async def _group(
        self,
        request: pb.GetGroupHistoryMessageRequest,
        context: Context,
        service: TimelineService,
    ) -> pb.GetGroupHistoryMessageReply:
        group = parse_id(request.group, "group", self.limits)
        found, next_before = await self._history(service, group, request, context)
        return pb.GetGroupHistoryMessageReply(entry_set=found, next_before=next_before)

    async def _history(
        self,
        service: TimelineService,
        timeline_id: str,
        request: pb.GetSingleHistoryMessageRequest | pb.GetGroupHistoryMessageRequest,
        context: Context,
    ) -> tuple[list[pb.TimelineEntry], int]:
        """A page of history and, backward, the next page's `before` (0 forward). Forward,
        extension wait_ms holds it while empty, as a sync."""
        count = parse_count(request.count, "count", self.limits)
        if request.direction == pb.HISTORY_DIRECTION_BACKWARD:
            before = parse_int64(request.before, "before")
            page = await self.holds.run(
                partial(service.history_backward, timeline_id, before, count)
            )
            return entries(page.entries), page.next_before
        if request.direction != pb.HISTORY_DIRECTION_FORWARD:
            raise InvalidParam("direction must be forward or backward", field="direction")
        last_read = parse_int64(request.last_read, "last_read")
        wait_ms = parse_int64(request.wait_ms, "wait_ms")
        found = await self.holds.read(
            context,
            Timeline(Kind.HISTORY, timeline_id),
            wait_ms,
            lambda: entries(service.history(timeline_id, last_read, count)),
            bool,
        )
        return found, 0


def _has_entries(page: pb.SyncMessageReply) -> bool:
    return len(page.entry_set) > 0


def _int32(value: int) -> int:
    """An unread count as the int32 it is sent as (a count that high is not expected)."""
    return min(value, INT32_MAX)


def _conversation(state: ConversationState) -> pb.Conversation:
    # last_message is unset while none is stored (HTTP's lastMessage: null); it carries the
    # sequence, message and timestamp only, as HTTP's (no conversation fields).
    last = entries([state.last])[0] if state.last is not None else None
    return pb.Conversation(
        type=state.kind.value,
        conversation=state.peer,
        latest_seq=state.latest,
        read_seq=state.read,
        unread=_int32(state.unread),
        last_message=last,
    )


def _device(device: Device) -> pb.Device:
    item = pb.Device(device=device.device, position=device.position)
    set_timestamp(item.last_seen, device.last_seen_ms)
    return item
