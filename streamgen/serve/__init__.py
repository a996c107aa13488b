"""`streamgen serve`: the engine behind a web page, a WebSocket endpoint, /metrics, and MQTT workers
that share sessions over a broker (see README.md, "Serving")."""


class ServeError(Exception):
    """The server cannot start (one line for the user)."""
