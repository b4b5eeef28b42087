"""The Hugging Face hub from a machine that may be offline: one quick reachability check, then
either the network or the local caches only, so an offline run fails in seconds with one line
instead of minutes of retries.
"""
from __future__ import annotations

import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from src.errors import UserError


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub endpoint cannot be connected to quickly."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def cache_only():
    """huggingface_hub and datasets look only in their local caches for the duration."""
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def load_dataset(path: str, config: str | None, split: str, what: str, offline_hint: str):
    """``datasets.load_dataset`` for ``what`` (e.g. "--dataset wikitext"): from the hub when it
    is reachable, else from the local datasets cache; any failure is one UserError line."""
    import datasets

    online = hub_reachable()
    try:
        if online:
            return datasets.load_dataset(path, config, split=split)
        with cache_only():
            return datasets.load_dataset(path, config, split=split)
    except Exception as error:  # noqa: BLE001 - any failure of the library is one line here
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        where = "" if online else "the hub is unreachable (offline) and it is not in the local " \
                                  "datasets cache; "
        raise UserError(f"{what} could not be loaded: {where}{reason}; {offline_hint}") from None
