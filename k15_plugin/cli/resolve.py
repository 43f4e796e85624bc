"""Where a run's model and Hub dataset come from, found before anything loads (``k15-train``'s pre-Hydra checks).

``model.path`` (checked by :func:`k15_plugin.cli.inputs.check_inputs`), a built-in demo model and a local directory
need no network. A Hugging Face Hub id (``model.name``, or ``data.path`` with ``data.source=hub``) is looked up

* in the local cache: ``$HF_HOME/hub`` for a model (its ``config.json`` and weights), the datasets cache
  (``$HF_HOME/datasets``) for a dataset, as ``datasets`` keeps it for offline use;
* on the Hub, with one metadata call of at most :data:`HUB_TIMEOUT` seconds and no retries, unless
  ``HF_HUB_OFFLINE=1`` says not to.

The Hub reachable: the loaders fetch (or reuse the cache) as usual. The Hub unreachable but everything cached: the run
goes on from the cache in offline mode (one warning line), so the loaders do not spend a minute retrying. Neither:
:class:`~k15_plugin.errors.ConfigError` with one line naming the key and the offline ways (a local directory, or a
filled cache with ``HF_HUB_OFFLINE=1``), where loading used to retry for a minute and end in a traceback.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from k15_plugin.errors import ConfigError

HUB_TIMEOUT = 5.0  # seconds for the one metadata call; a reachable Hub answers in well under one
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TRUE = {"1", "ON", "YES", "TRUE"}

_FOUND: set[tuple] = set()  # (kind, id, endpoint) the Hub answered for: once per process, not once per variant


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hf_home() -> str | None:
    return os.environ.get("HF_HOME")


def hub_cache() -> str:
    """The Hub's file cache as the environment names it now (``HF_HUB_CACHE``, ``HF_HOME``) or at import."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(_hf_home(), "hub") if _hf_home() else constants.HF_HUB_CACHE


def datasets_cache() -> str:
    """The datasets cache (``HF_DATASETS_CACHE``, ``HF_HOME/datasets``): where ``load_dataset`` looks offline."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    if _hf_home():
        return os.path.join(_hf_home(), "datasets")
    import datasets.config

    return str(datasets.config.HF_DATASETS_CACHE)


def cached_config(repo_id: str) -> str | None:
    """The path of ``repo_id``'s config.json in the Hub cache, or None; nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache())
    except Exception:  # not a valid repo id, an unreadable cache: not there
        return None
    return config if isinstance(config, str) else None


def model_in_cache(repo_id: str) -> bool:
    """The Hub cache holds ``repo_id``'s config.json and weights (what ``from_pretrained`` reads offline)."""
    config = cached_config(repo_id)
    if config is None:
        return False
    snapshot = Path(config).parent
    return any((snapshot / name).is_file() for name in WEIGHT_FILES) or any(snapshot.glob("*.safetensors"))


def dataset_in_cache(repo_id: str, config_name: str | None) -> bool:
    """The datasets cache holds a prepared copy of ``repo_id`` (what ``load_dataset`` uses with HF_HUB_OFFLINE=1)."""
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(datasets_cache(), "___".join(parts))
    pattern = os.path.join(glob.escape(root), glob.escape(config_name) if config_name else "*", "*", "*")
    return any(os.path.isdir(p) for p in glob.glob(pattern))


def _ask_hub(kind: str, repo_id: str) -> tuple[str, str]:
    """One metadata call: ``("ok", "")``, ``("unreachable", why)`` or ``("missing", why)``."""
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if (kind, repo_id, endpoint) in _FOUND:
        return "ok", ""
    api = HfApi(endpoint=endpoint)
    info = api.model_info if kind == "model" else api.dataset_info
    try:
        info(repo_id, timeout=HUB_TIMEOUT)
    except HFValidationError:
        return "missing", f"not a Hub {kind} id either"
    except GatedRepoError:
        return "missing", f"a gated {kind} on the Hub that this machine's token cannot read (hf auth login)"
    except RepositoryNotFoundError:
        return "missing", f"not a {kind} on the Hugging Face Hub either (or a private one this machine cannot see)"
    except HfHubHTTPError:  # the Hub answered with an error of its own (busy, rate limit): let the loader try
        pass
    except (httpx.TransportError, OfflineModeIsEnabled, OSError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return "unreachable", f"{type(err).__name__}: {why}" if why else type(err).__name__
    _FOUND.add((kind, repo_id, endpoint))
    return "ok", ""


def _enable_offline() -> None:
    """Offline mode for the rest of this process, as ``HF_HUB_OFFLINE=1`` at start-up would have set it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub and transformers
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def _resolve(kind: str, key: str, repo_id: str, cached: bool, cache: str, offline_ways: str) -> str:
    """``"cache"`` or ``"hub"`` for the Hub id ``repo_id`` named by ``key``; raises ConfigError when neither has it."""
    where = f"{key}={repo_id}"
    if hub_offline():
        if cached:
            return "cache"
        raise ConfigError(
            f"{where}: not a local path, not in the local cache ({cache}), and HF_HUB_OFFLINE=1 keeps the Hugging Face "
            f"Hub out; {offline_ways}"
        )
    status, why = _ask_hub(kind, repo_id)
    if status == "ok":
        return "hub"
    if status == "missing":
        raise ConfigError(f"{where}: not a local path, and {why}")
    if cached:
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"k15-train: warning: the Hugging Face Hub cannot be reached ({why}): {where} is loaded from the "
                "local cache, in offline mode (HF_HUB_OFFLINE=1)",
                file=sys.stderr,
                flush=True,
            )
        _enable_offline()
        return "cache"
    raise ConfigError(
        f"{where}: not a local path, not in the local cache ({cache}), and the Hugging Face Hub cannot be reached "
        f"({why}); {offline_ways}"
    )


def check_model_source(model: DictConfig) -> str:
    """Where the model comes from: ``"path"``, ``"demo"``, ``"local"``, ``"cache"`` or ``"hub"``; raises ConfigError."""
    from k15_plugin.data.arithmetic import DEMO_MODELS

    if model.path is not None:
        return "path"  # a directory written by save_pretrained (inputs.check_inputs looks inside)
    if model.name in DEMO_MODELS:
        return "demo"
    if Path(model.name).is_dir():
        return "local"
    ways = (
        "offline, set model.path to a directory written by save_pretrained, or fill the cache on a connected machine "
        "(load the model once) and run with HF_HUB_OFFLINE=1"
    )
    return _resolve("model", "model.name", model.name, model_in_cache(model.name), hub_cache(), ways)


def check_dataset_source(data: DictConfig) -> str:
    """Where ``data.source=hub``'s dataset comes from (``"local"``, ``"cache"``, ``"hub"``); other sources need none."""
    if data.source != "hub":
        return "local" if data.source == "jsonl" else "demo"
    if Path(data.path).exists():
        return "local"
    ways = (
        "offline, use data=jsonl data.path=<file> or a local dataset directory as data.path, or fill the cache on a "
        "connected machine (load the dataset once) and run with HF_HUB_OFFLINE=1"
    )
    cached = dataset_in_cache(data.path, data.config_name)
    return _resolve("dataset", "data.path", data.path, cached, datasets_cache(), ways)


def check_sources(cfg: DictConfig) -> None:
    """The model and the dataset ``cfg`` names can be had (locally, from the cache or the Hub); one line otherwise.

    Skipped for a dry run (host=openrlhf, host=verl), which loads nothing."""
    if cfg.host.dry_run:
        return
    check_model_source(cfg.model)
    check_dataset_source(cfg.data)
