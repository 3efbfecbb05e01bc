"""ChainFed on Flower: the same :class:`chainfed_core.federated.Server` driven by a Flower
strategy (``strategy``), with thin ServerApp/ClientApp files (``server_app``, ``client_app``).
The runnable Flower app project lives in ``flower_app/`` at the repository root."""
