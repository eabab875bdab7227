"""The console: a page that drives the API from a browser, served by the service itself."""

from timeline.console.routes import register

__all__ = ["register"]
