"""The gRPC API (go-timeline's timeline.v1.Timeline, and our extensions): timeline-grpc.

v1/timeline.proto is the interface; v1's Python code is generated from it at install time
(codegen.py). servicer.py maps each method onto the service layer with the HTTP API's
validation; calls.py gives every call what ops.py gives an HTTP request (request id, bearer
token, deadline, access line, metrics) and turns errors into go-kratos's status;
waiting.py holds the calls that wait for entries (wait_ms, Subscribe); server.py builds
and runs the server; supervisor.py runs it beside gunicorn's workers.
"""
