"""ChainFed on Flower: the core's rounds (:func:`chainfed_core.rounds.run_rounds`) with Flower
as their transport (``transport``), and thin ServerApp/ClientApp files (``server_app``,
``client_app``). The runnable Flower app project lives in ``flower_app/`` at the repository root."""
