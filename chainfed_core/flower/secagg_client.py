"""The SecAgg+ ClientApp (the server side: :mod:`.secagg_app`): Flower's ``secaggplus_mod``
around the project's client update.

Every message a deployed SuperNode receives runs in a fresh ClientApp process, and three of
SecAgg+'s four stages (setup, share keys, unmask) are the mod's alone: this module imports only
Flower at the top, and the project's client (:mod:`.client_app`: torch, the model) when a message
needs it (discovery, FOAT, the collect-masked-vectors stage).

With DP (the TRAIN config carries ``dp-clip-norm`` C): the node clips Δ_k to norm C with
:func:`chainfed_core.privacy.clip_delta` (the DP path's own clipping) before the mod masks it, and
weighs in with 1 (DP-FedAvg's equal weights; the server sets W = 1, so the mod's factor is exactly
1 and every element is within [-C, C]: the clipping range); one element C·[Δ_k was clipped] is
appended, so the secure sum gives the server the number of clients that clipped, not who did.

Node config ``secagg-drop-after=share-keys`` (fault injection, for tests): the node fails each
round once it has shared its keys, before it sends its masked vector.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

DROP_KEY = "secagg-drop-after"

clientapp = ClientApp()


def _dropout_mod(msg: Message, context: Context, call_next) -> Message:
    """Fault injection (node config ``secagg-drop-after=share-keys``): fail once the keys are shared."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.metadata.message_type == MessageType.TRAIN \
        else None
    if (str(context.node_config.get(DROP_KEY, "")) == "share-keys" and configs is not None
            and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS):
        raise RuntimeError(f"{DROP_KEY}=share-keys: this node drops out after sharing its keys")
    return call_next(msg, context)


def _clipped(delta: list[np.ndarray], weight: int, context: Context) -> int:
    """The elements of the weighted update a_k·Δ_k (a_k = round(Q·n_k/W)/Q, as the mod weighs it)
    outside [-c, c], which the mod clips (the setup stage left c, Q and W in the node's state)."""
    sa = context.state.config_records.get(RECORD_KEY_STATE)
    if sa is None:
        return 0
    c, q, w = float(sa["clipping_range"]), int(sa["target_range"]), float(sa["max_weight"])
    a = round(weight / w * q) / q
    return int(sum((np.abs(d * a) > c).sum() for d in delta))


@clientapp.query()
def query(msg: Message, context: Context) -> Message:
    from . import client_app

    return client_app.query(msg, context)


@clientapp.train(mods=[_dropout_mod, secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """The project's client update, handed to ``secaggplus_mod`` as Δ_k (sorted by name) and its
    weight: n_k, or with DP Δ_k clipped to norm C, weight 1 and the clipped flag (module docstring)."""
    from . import client_app
    from .transport import from_record

    reply = client_app.train(msg, context)
    window, state = from_record(msg.content["window"]), from_record(reply.content["arrays"])
    names = sorted(window)
    delta = {n: state[n].double() - window[n].double() for n in names}
    metrics = dict(reply.content["metrics"])
    weight = int(metrics["num-examples"])
    config = msg.content["config"]
    flag = []
    if "dp-clip-norm" in config:
        from ..privacy import clip_delta

        clip_norm = float(config["dp-clip-norm"])
        delta, norm = clip_delta(delta, clip_norm)
        weight, flag = 1, [np.array([clip_norm if norm > clip_norm else 0.0])]
    vector = [delta[n].numpy() for n in names] + flag
    metrics["secagg-clipped"] = _clipped(vector, weight, context)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(vector), weight, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
