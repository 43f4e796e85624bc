"""``k15-train``: the Hydra entry point (also ``python -m k15_plugin.cli.train``).

    k15-train                                   # the built-in CPU demo, k1.5 mirror descent
    k15-train algorithm=grpo trainer.max_steps=5
    k15-train -m algorithm=kimi_md,grpo         # both, one job each

Every override is composed and checked before Hydra starts the job (so before any model or dataset loads and before
the run directory exists): a bad key, type or value exits with status 2 and one line naming the key.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from k15_plugin.cli.hosts import HOSTS, get_host
from k15_plugin.cli.inputs import check_inputs
from k15_plugin.cli.resolve import check_sources
from k15_plugin.cli.schema import check_known_keys, register_schemas
from k15_plugin.errors import ConfigError, K15Error

_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--version")


def config_dir() -> Path:
    """``conf/`` inside an installed wheel (k15_plugin/conf), else the repository's top-level ``conf/``."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def run_id() -> str:
    """Name of this launch's run directory, the same in every process of one ``accelerate launch``.

    Processes of a distributed launch share their parent (the launcher's agent), so its start time and pid name the
    run; a plain process uses its own. Multi-node runs should set ``hydra.run.dir`` explicitly.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import psutil

        pid = os.getppid()
        started = psutil.Process(pid).create_time()
    else:
        pid, started = os.getpid(), time.time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started)) + f"_{pid}"


def _register() -> None:
    register_schemas()
    if not OmegaConf.has_resolver("k15_run_id"):
        OmegaConf.register_new_resolver("k15_run_id", run_id, use_cache=True)


# ------------------------------------------------------------------------------------------------ checking overrides
def _override_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each sweep (``a=x,y``), so a multirun is checked value by value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for raw, ov in zip(overrides, parsed, strict=True):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([raw])
    variants = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        for value in c[1:]:
            variants.append([*variants[0][:i], value, *variants[0][i + 1 :]])
    return variants if len(variants) < 64 else list(itertools.islice(variants, 64))


def _one_line(err: Exception) -> str:
    """Hydra's and OmegaConf's composition errors as one line that keeps the key and the allowed values."""
    text = str(err).strip()
    if "Available options in '" in text:  # an unknown option of a config group
        wrong = text.split("Could not find '", 1)[-1].split("'", 1)[0]  # e.g. sampler/nonexistent
        group, _, option = wrong.rpartition("/")
        listing = text.split("Available options in '", 1)[1].split("Config search path", 1)[0].splitlines()[1:]
        options = [o.strip() for o in listing if o.strip() and not o.strip().endswith("_schema")]
        return f"{group}={option} is not an option of the config group '{group}'; allowed: {', '.join(options)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if err.__cause__ is not None:  # "Could not override 'x.y'": the cause says why (unknown key, wrong type)
        lines = [line.strip() for line in str(err.__cause__).splitlines() if line.strip()] or lines
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    first = lines[0] if lines else type(err).__name__
    return f"{key}: {first}" if key and key not in first else first


def check_overrides(overrides: list[str]) -> None:
    """Compose and check every variant of ``overrides``; raises :class:`ConfigError` with one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    ours = [o for o in overrides if not o.lstrip("+~").startswith("hydra.") and o not in ("-m", "--multirun")]
    GlobalHydra.instance().clear()
    plans: dict[str, list] = {}  # per host: checked together (one start of OpenRLHF's parser for a multirun)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for variant in _override_variants(ours) if ours else [[]]:
            try:
                cfg = compose(config_name="config", overrides=variant)
                OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            except Exception as err:  # composition errors of any kind become one line
                raise ConfigError(_one_line(err)) from None
            check_known_keys(cfg)  # `+key=value` adds keys that struct mode would refuse
            host = get_host(cfg.host.name)
            if cfg.host.dry_run and not host.dry_run:
                raise ConfigError(
                    f"host.dry_run: only {', '.join(f'host={n}' for n, h in HOSTS.items() if h.dry_run)} has a dry "
                    "run (k15-train --cfg job prints the composed config)"
                )
            plans.setdefault(cfg.host.name, []).append(host.check(cfg))
            check_inputs(cfg)  # the data file, model directory and checkpoint it names
            check_sources(cfg)  # the model and Hub dataset: a local path, the cache or the Hub, else one line
    GlobalHydra.instance().clear()
    for name, host_plans in plans.items():
        if HOSTS[name].check_all is not None:
            HOSTS[name].check_all(host_plans)


# ------------------------------------------------------------------------------------------------ the job
def run(cfg: DictConfig) -> dict:
    """Run the job on ``host.name``'s host; returns the summary written to ``<run dir>/summary.json``."""
    from hydra.core.hydra_config import HydraConfig

    return HOSTS[cfg.host.name].run(cfg, Path(HydraConfig.get().runtime.output_dir))


_register()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point ``k15-train``: check every override (one line, exit 2, on an error), then run the job."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not the user's
    argv = sys.argv[1:]
    if not any(a in _INFO_FLAGS or a.startswith("--cfg") for a in argv):
        overrides = [a for a in argv if not a.startswith("-")]
        try:
            check_overrides(overrides)
        except K15Error as err:  # ConfigError, and any other user-facing error of the checks
            print(f"k15-train: error: {err}", file=sys.stderr)
            sys.exit(2)
    _hydra_entry()


if __name__ == "__main__":
    main()
