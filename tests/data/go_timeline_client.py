"""A go-timeline client, for tests/test_grpc_wire.py: it knows only the stubs generated from
go_timeline.proto (go-timeline's contract) and grpc, never this project's code or .proto.

    python go_timeline_client.py STUBS_DIR ADDRESS  < calls.json  > replies.json

Each call is {"method": "Send", "request": {...}}, the request in protobuf's JSON form with
proto field names; a field go-timeline's messages do not have makes it fail, as it would
fail to compile in a go-timeline client. Each reply is {"reply": {...}} (unset fields
written, unknown ones dropped, as such a client reads them) or {"error": {"code", "message",
"reason", "metadata"}}, the reason and metadata from the status's google.rpc.ErrorInfo, as
go-kratos's errors.FromError reads them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, sys.argv[1])
import go_timeline_pb2
import go_timeline_pb2_grpc

REQUESTS = {
    "Send": go_timeline_pb2.SendMessageRequest,
    "SendGroup": go_timeline_pb2.SendGroupRequest,
    "GetSyncMessage": go_timeline_pb2.SyncMessageRequest,
    "GetSingleHistoryMessage": go_timeline_pb2.GetSingleHistoryMessageRequest,
    "GetGroupHistoryMessage": go_timeline_pb2.GetGroupHistoryMessageRequest,
}


def error(exc: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"code": exc.code().name, "message": exc.details()}
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found |= {"reason": info.reason, "metadata": dict(info.metadata)}
    return found


def main() -> None:
    calls = json.load(sys.stdin)
    replies = []
    with grpc.insecure_channel(sys.argv[2]) as channel:
        stub = go_timeline_pb2_grpc.TimelineStub(channel)
        for call in calls:
            request = json_format.ParseDict(call["request"], REQUESTS[call["method"]]())
            try:
                reply = getattr(stub, call["method"])(request, timeout=10)
            except grpc.RpcError as exc:
                replies.append({"error": error(exc)})
                continue
            body = json_format.MessageToDict(
                reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            replies.append({"reply": body})
    json.dump(replies, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
