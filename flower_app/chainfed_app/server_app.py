"""ServerApp entry point; the logic is in chainfed_core.flower.server_app."""
from chainfed_core.flower import server_app as _server_app

app = _server_app.app
