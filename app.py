"""The WSGI entry point: `gunicorn app:app`."""

from timeline.factory import create_app

app = create_app()
