"""ClientApp entry point; the logic is in chainfed_core.flower.client_app."""
from chainfed_core.flower import client_app as _client_app

app = _client_app.app
