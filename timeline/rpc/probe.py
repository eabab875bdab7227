"""`python -m timeline.rpc.probe`: ask timeline-grpc's health service, for container health
checks. It asks at TIMELINE_GRPC_BIND, and when that is unset at the default, 127.0.0.1:9000,
where `make run` serves gRPC. Exit status 0 when it answers SERVING, 1 otherwise; one line
says what was checked and, on a failure, why. TIMELINE_GRPC_BIND=off (no gRPC served) checks
nothing, says so, and exits 0: the image's health check then stands on HTTP alone.

    python -m timeline.rpc.probe                          # liveness: the service ""
    python -m timeline.rpc.probe --service timeline.v1.Timeline   # readiness
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2

from timeline.settings import SettingsError, load_settings

#: Where a wildcard listening address is reached from this machine (a listening address
#: read here, to dial it: nothing binds).
_LOCAL = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}  # noqa: S104


def target(bind: str) -> str:
    """The address to dial for a listening address: a wildcard host is this machine."""
    if bind.startswith("unix:"):
        return bind
    host, _, port = bind.rpartition(":")
    return f"{_LOCAL.get(host, host)}:{port}"


def check(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health service's answer for `service` at `address`, by name (SERVING, ...)."""
    with grpc.insecure_channel(address) as channel:
        health_check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        reply = health_check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m timeline.rpc.probe")
    parser.add_argument("--service", default="", help='"" (liveness) or timeline.v1.Timeline')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (2)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"timeline: {exc}")
    if settings.grpc_listen is None:
        print("timeline-grpc: not checked: gRPC is off (grpc_bind is off)")
        return
    address = target(settings.grpc_listen)
    # Unset, grpc_bind is the default, where `make run` serves: checked all the same (a probe
    # that passes having asked nothing hides a gRPC server that is not there), and said so.
    unset = "" if settings.grpc_bind else " (grpc_bind unset: its default, as make run serves)"
    what = args.service or "(liveness)"
    try:
        status = check(address, args.service, args.timeout)
    except grpc.RpcError as exc:
        why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.Call) else repr(exc)
        hint = "; TIMELINE_GRPC_BIND says where it serves, off when nothing does" if unset else ""
        sys.exit(f"timeline-grpc at {address}{unset}: {why}{hint}")
    if status != "SERVING":
        sys.exit(f"timeline-grpc at {address}{unset}: {what} is {status}")
    print(f"timeline-grpc at {address}{unset}: {what} is SERVING")


if __name__ == "__main__":
    main()
