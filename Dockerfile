# timeline: the service under gunicorn, as a non-root user: HTTP on 8000 and, beside the
# workers, the gRPC API (timeline-grpc) on 9000, as go-timeline serves them.
#   docker build -t timeline .      (or: make docker)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    TIMELINE_GRPC_BIND=0.0.0.0:9000

WORKDIR /app

# Dependencies first, from the lock alone (requirements/runtime.txt: exact versions with their
# hashes, what CI tested): this layer is rebuilt only when the lock changes.
COPY requirements/runtime.txt requirements/
RUN pip install --require-hashes --only-binary=:all: -r requirements/runtime.txt

# The service itself: run from /app (app.py, gunicorn.conf.py, lua/, configs/, timeline/;
# timeline/lua is a link to lua/).
COPY app.py gunicorn.conf.py ./
COPY configs/ configs/
COPY lua/ lua/
COPY timeline/ timeline/
# The gRPC code, generated from timeline/rpc/v1/timeline.proto (never copied in: see
# .dockerignore) by the lock's grpcio-tools, pyproject.toml's build requirement.
RUN python -m timeline.rpc.codegen

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /app timeline \
    && mkdir -p /app/var \
    && chown timeline:timeline /app/var
USER timeline

EXPOSE 8000
EXPOSE 9000
# Liveness of both: gunicorn's /healthz and timeline-grpc's health service (the probe passes
# at once when TIMELINE_GRPC_BIND is off).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)" \
        && python -m timeline.rpc.probe --timeout 1

CMD ["gunicorn", "app:app"]
