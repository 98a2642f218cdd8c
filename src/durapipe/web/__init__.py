"""``durapipe ui``: a web console over an App's runs (needs FastAPI: ``pip install durapipe[service]``).

>>> from durapipe.web import create_console
>>> console = create_console(app, token="alice:s3cret")
"""

from .app import create_console

__all__ = ["create_console"]
