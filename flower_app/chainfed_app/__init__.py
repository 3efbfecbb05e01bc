"""Flower app entry points for ChainFed (thin: the logic lives in chainfed_core.flower)."""
