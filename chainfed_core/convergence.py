"""When a run has converged: the one stopping rule every method trains under.

The paper trains "every method until the global model converges" (Appendix D.4) without
saying how that is decided. The rule here, stated once and applied to every method alike
(``fed.stop_patience``, ``fed.stop_tolerance``, ``fed.stop_min_gain``): after each evaluation
of the global model, the run has **converged** when its last ``patience`` evaluations all lie
within ``tolerance`` of the best test accuracy it has reached so far, and that best exceeds the
first evaluation by at least ``min_gain``; it then stops, otherwise it runs to ``fed.rounds``
(the cap). The gain condition keeps a run that sits flat where it started (a model predicting
one class for its first evaluations while its training loss falls) from being called converged. The rule reads the test accuracy, as the paper's protocol implies
(it has no validation split); a reader comparing methods should know that the stopping point
is chosen on the data that is scored.

The costs that Table 2 and Appendix H compare are counted up to a round (:func:`cost_until`):
rounds, bytes exchanged (up, down and context) and client training seconds. A run's
**convergence round** (:func:`convergence_round`) is the first evaluated round whose accuracy
lies within ``tolerance`` of the run's final best: the rounds after it only confirm the plateau.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

_EPS = 1e-12        # accuracies are fractions of a test set: a tolerance of 0.1 means 0.1, not 0.1 - 1 ulp


def evaluations(history: Sequence[dict]) -> list[tuple[int, float]]:
    """(rounds completed, test accuracy) at every evaluated round."""
    return [(m["round"] + 1, m["test_accuracy"]) for m in history if "test_accuracy" in m]


def converged(history: Sequence[dict], patience: Optional[int], tolerance: float, min_gain: float = 0.0) -> bool:
    """Whether the last ``patience`` evaluations all lie within ``tolerance`` of the best so far
    and the best is at least ``min_gain`` above the first evaluation (never, with ``patience``
    None: the run goes to its cap)."""
    if patience is None:
        return False
    accs = [a for _, a in evaluations(history)]
    return (len(accs) >= patience and min(accs[-patience:]) >= max(accs) - tolerance - _EPS
            and max(accs) >= accs[0] + min_gain - _EPS)


def convergence_round(history: Sequence[dict], tolerance: float) -> float:
    """Rounds completed at the first evaluation within ``tolerance`` of the run's best (NaN: none)."""
    evals = evaluations(history)
    if not evals:
        return math.nan
    best = max(a for _, a in evals)
    return float(next(r for r, a in evals if a >= best - tolerance - _EPS))


def first_at(points: Sequence[tuple], target: float) -> Optional[tuple]:
    """The first of ``(round, accuracy, ...)`` points whose accuracy reaches ``target`` (None: none)."""
    return next((p for p in points if p[1] >= target - _EPS), None)


def first_reaching(history: Sequence[dict], target: float) -> float:
    """Rounds completed at the first evaluation reaching ``target`` accuracy (NaN: never)."""
    point = first_at(evaluations(history), target)
    return math.nan if point is None else float(point[0])


def cost_until(history: Sequence[dict], rounds: float) -> dict[str, float]:
    """Rounds, bytes exchanged and client training seconds in the first ``rounds`` rounds
    (all NaN where ``rounds`` is NaN: the point was never reached)."""
    if rounds != rounds:
        return {"rounds": math.nan, "bytes": math.nan, "client_seconds": math.nan}
    done = [m for m in history if m["round"] < rounds]
    return {"rounds": float(rounds),
            "bytes": float(sum(m.get("bytes_up", 0) + m.get("bytes_down", 0) + m.get("bytes_down_context", 0)
                               for m in done)),
            "client_seconds": float(sum(m.get("seconds_train", 0.0) for m in done))}


def finished(config, state: dict, min_rounds: int = 0) -> bool:
    """Whether a run is over: ``fed.rounds`` done, or, after ``min_rounds`` (the method's
    :meth:`~chainfed_core.methods.Method.min_rounds`), converged by ``fed.stop_patience``."""
    if state["round"] >= config.fed.rounds:
        return True
    return state["round"] >= min_rounds and converged(state["history"], config.fed.stop_patience,
                                                      config.fed.stop_tolerance, config.fed.stop_min_gain)
