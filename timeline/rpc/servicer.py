"""timeline.v1.Timeline: each method parses and validates its request with the HTTP API's rules
(timeline.validation, in the same order, so a request refused over HTTP is refused here
with the same reason, message and metadata), calls the same service method and builds
the reply. Nothing more: calls.py does the rest."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import timestamp_pb2

from timeline.errors import InvalidParam
from timeline.model import Entry, Message, conversation_id
from timeline.rpc.calls import Calls
from timeline.rpc.v1 import timeline_pb2 as pb
from timeline.rpc.v1 import timeline_pb2_grpc
from timeline.service import TimelineService
from timeline.validation import (
    Limits,
    check_batch,
    check_documents,
    check_fan_out,
    parse_count,
    parse_id,
    parse_int64,
    parse_members,
    parse_message,
)

Context = grpc.ServicerContext


def entries(found: Sequence[Entry]) -> list[pb.TimelineEntry]:
    """Entries as TimelineEntry; `timestamp` is left unset where the store does not know it."""
    out = []
    for entry in found:
        item = pb.TimelineEntry(sequence=entry.seq, message=entry.message)
        if entry.created_at_ms > 0:
            seconds, millis = divmod(entry.created_at_ms, 1000)
            item.timestamp.seconds = seconds
            item.timestamp.nanos = millis * 1_000_000
        out.append(item)
    return out


def timestamp_ms(value: timestamp_pb2.Timestamp) -> int:
    """A TimelineEntry's timestamp back in milliseconds since the epoch (0: unset)."""
    return value.seconds * 1000 + value.nanos // 1_000_000


class TimelineServicer:
    """The methods of timeline.v1.Timeline, registered by add_to_server."""

    def __init__(self, limits: Limits, calls: Calls) -> None:
        self.limits = limits
        # The names protoc's generated registration looks for, each wrapped by `calls`.
        self.Send = calls.method("Send", self._send, writes=True)
        self.SendGroup = calls.method("SendGroup", self._send_group, writes=True)
        self.GetSyncMessage = calls.method("GetSyncMessage", self._sync)
        self.GetSingleHistoryMessage = calls.method("GetSingleHistoryMessage", self._single)
        self.GetGroupHistoryMessage = calls.method("GetGroupHistoryMessage", self._group)
        self.Ack = calls.method("Ack", self._ack)

    def add_to_server(self, server: grpc.Server) -> None:
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
        failed = service.send_group(group, members, messages, client_msg_id)
        return pb.SendGroupReply(failed_members=failed)

    def _ack(
        self, request: pb.AckRequest, context: Context, service: TimelineService
    ) -> pb.AckReply:
        member = parse_id(request.member, "member", self.limits)
        if not request.HasField("seq"):
            raise InvalidParam("seq is required", field="seq")
        seq = parse_int64(request.seq, "seq")
        return pb.AckReply(min_seq=service.ack(member, seq))

    # --- reads -------------------------------------------------------------------------

    def _sync(
        self, request: pb.SyncMessageRequest, context: Context, service: TimelineService
    ) -> pb.SyncMessageReply:
        limits = self.limits
        member = parse_id(request.member, "member", limits)
        last_read = parse_int64(request.last_read, "last_read")
        count = parse_count(request.count, "count", limits)
        result = service.sync(member, last_read, count)
        return pb.SyncMessageReply(
            latest_seq=result.latest_seq,
            entry_set_last_seq=result.entries[-1].seq if result.entries else 0,
            entry_set=entries(result.entries),
            min_seq=result.min_seq,
        )

    def _single(
        self,
        request: pb.GetSingleHistoryMessageRequest,
        context: Context,
        service: TimelineService,
    ) -> pb.GetSingleHistoryMessageReply:
        a = parse_id(getattr(request, "from"), "from", self.limits)
        b = parse_id(request.to, "to", self.limits)
        found, next_before = self._history(service, conversation_id(a, b), request)
        return pb.GetSingleHistoryMessageReply(entry_set=found, next_before=next_before)

    def _group(
        self,
        request: pb.GetGroupHistoryMessageRequest,
        context: Context,
        service: TimelineService,
    ) -> pb.GetGroupHistoryMessageReply:
        group = parse_id(request.group, "group", self.limits)
        found, next_before = self._history(service, group, request)
        return pb.GetGroupHistoryMessageReply(entry_set=found, next_before=next_before)

    def _history(
        self,
        service: TimelineService,
        timeline_id: str,
        request: pb.GetSingleHistoryMessageRequest | pb.GetGroupHistoryMessageRequest,
    ) -> tuple[list[pb.TimelineEntry], int]:
        """A page of history and, backward, the next page's `before` (0 forward)."""
        count = parse_count(request.count, "count", self.limits)
        if request.direction == pb.HISTORY_DIRECTION_BACKWARD:
            before = parse_int64(request.before, "before")
            page = service.history_backward(timeline_id, before, count)
            return entries(page.entries), page.next_before
        if request.direction != pb.HISTORY_DIRECTION_FORWARD:
            raise InvalidParam("direction must be forward or backward", field="direction")
        last_read = parse_int64(request.last_read, "last_read")
        return entries(service.history(timeline_id, last_read, count)), 0
