"""gunicorn settings: `gunicorn app:app` reads this file from the working directory of a
checkout. They live in the package (timeline/gunicorn_conf.py), so that an installed package
is served with the same ones: `gunicorn -c python:timeline.gunicorn_conf
'timeline.factory:create_app()'`.
"""

from timeline.gunicorn_conf import *  # noqa: F403
