"""timeline: a message-sync service for chat backends, go-timeline's HTTP API on Redis + Lua."""

__version__ = "0.1.0"
