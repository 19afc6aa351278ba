"""``detr serve``: a detection HTTP service with dynamic batching, and an attention explorer in the browser.

    from detr.serve import ServeOptions, create_app
    app = create_app(detector, ServeOptions(max_batch=8))      # a Starlette (ASGI) application

Needs the ``[serve]`` extra (Starlette, uvicorn, prometheus_client, python-multipart); nothing else in the
package imports this module. Layout: ``options`` (limits and flags), ``images`` (bytes -> a checked RGB
image), ``worker`` (the batching thread that owns the model), ``responses`` (results -> JSON),
``metrics`` (Prometheus), ``app`` (routes), ``server`` (uvicorn with a draining shutdown), ``static/``
(the explorer page).
"""

from __future__ import annotations

from .options import ServeOptions

__all__ = ["ServeOptions", "create_app", "serve"]


def __getattr__(name: str):  # the ASGI stack is imported only when an app is made
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(name)
