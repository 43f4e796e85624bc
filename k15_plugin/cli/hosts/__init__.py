"""The hosts ``k15-train`` can run on, by ``host.name``: one :class:`Host` entry each.

A host turns the composed config (the same ``algorithm``, ``model``, ``data``, ``reward``, ``sampler``, ``rollout`` and
``trainer`` groups for every host) into its own run. ``k15-train`` calls ``check`` for every variant of a multirun
before anything loads, ``check_all`` once with all of their plans (OpenRLHF starts its parser once for them), and
``run`` inside the Hydra job. A new host is a module here with these three functions, an entry in :data:`HOSTS` and a
``conf/host/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from k15_plugin.cli.hosts import openrlhf, trl, verl
from k15_plugin.errors import ConfigError


@dataclass(frozen=True)
class Host:
    """One host of ``k15-train``.

    Args:
        check: ``check(cfg) -> plan``: every value checked for this host, before anything loads; raises
            :class:`~k15_plugin.errors.ConfigError` naming the Hydra key.
        check_all: ``check_all(plans)``: the checks that are cheaper once for all variants (None: none).
        run: ``run(cfg, run_dir) -> summary``: the job.
        dry_run: whether ``host.dry_run=true`` means something here (print the host's command, start nothing).
    """

    check: Callable[[DictConfig], Any]
    check_all: Callable[[list], None] | None
    run: Callable[[DictConfig, Path], dict]
    dry_run: bool = False


HOSTS: dict[str, Host] = {
    "trl": Host(check=trl.check_config, check_all=None, run=trl.run),
    "openrlhf": Host(check=openrlhf.check, check_all=openrlhf.check_plans, run=openrlhf.run, dry_run=True),
    "verl": Host(check=verl.check, check_all=None, run=verl.run, dry_run=True),
}


def get_host(name: str) -> Host:
    """The host ``name``; a :class:`~k15_plugin.errors.ConfigError` lists the known ones."""
    if name not in HOSTS:
        raise ConfigError(f"host={name} is not one of {list(HOSTS)}")
    return HOSTS[name]
