"""Hydra glue for every `python -m rayflow.X` entry point, in one place.

The configs ship inside the package (`rayflow/conf`; the checkout's top-level `conf/` links to it), so a wheel
install composes them too. Entry points are the only modules that see Hydra's DictConfig: they turn it into
validated dataclasses here and hand those on. The dataclasses of rayflow.config are Hydra's schema, registered
here (`register_schema`): every key, type and default lives in them, and the YAML only selects and overrides.

User errors (a bad key or value, a missing file or folder, a run another driver holds, ...) end the command with
exit status 2 and one line on stderr, `rayflow: <what is wrong>; FIX THIS by <how>`, and no traceback. Every
user-facing error in rayflow says "FIX THIS"; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rayflow.config import ConfigError, JobConfig, SweepConfig
from rayflow.resolve import resolve

CONF_DIR = Path(__file__).resolve().parent / "conf"
ASSETS = Path(__file__).resolve().parent / "assets"
FIX = "FIX THIS"
# `${rayflow_asset:teacher-mnist16.safetensors}` in YAML: a file shipped inside the package (the demo's teacher).
OmegaConf.register_new_resolver("rayflow_asset", lambda name: str(ASSETS / name), replace=True)
# Sections registered with every key and default but untyped: users replace their free-form mappings by deleting
# and re-adding them (`'~teacher.net' '+teacher.net={...}'`, `'~sweep.space' '+sweep.space={...}'`, README), and
# OmegaConf refuses to delete a field of a typed node. JobConfig and SweepConfig check these types instead.
UNTYPED_SECTIONS = ("teacher", "sweep")


def register_schema() -> None:
    """Register the dataclasses with Hydra as structured configs: `base_job` (JobConfig; conf/config.yaml's defaults
    list starts with it) and `base_sweep` (SweepConfig under `sweep`; conf/tune.yaml). So Hydra knows every key, its
    type and its default from the one place they live, and the YAML only selects and overrides."""
    job = JobConfig()
    node: dict[str, Any] = {"task": job.task}
    for f in fields(JobConfig):
        if f.name != "task":
            section = getattr(job, f.name)
            node[f.name] = asdict(section) if f.name in UNTYPED_SECTIONS else OmegaConf.structured(section)
    store = ConfigStore.instance()
    store.store(name="base_job", node=node)
    store.store(name="base_sweep", node={"sweep": asdict(SweepConfig())})


register_schema()  # with the resolver above: before any entry point, test or benchmark composes conf/


def plain(cfg: DictConfig) -> dict:
    """Hydra's composed config as plain dicts and lists, interpolations resolved, without `hydra`."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    container.pop("hydra", None)
    return container


def job_from_hydra(cfg: DictConfig) -> JobConfig:
    """Hydra's composed config -> validated, resolved JobConfig (file digests and lookups done, `resolve`)."""
    return resolve(JobConfig.from_dict(plain(cfg)))


def sweep_from_hydra(cfg: DictConfig) -> tuple[JobConfig, SweepConfig]:
    """conf/tune.yaml composed -> (the trials' base JobConfig, resolved; SweepConfig), both validated."""
    container = plain(cfg)
    sweep = container.pop("sweep", None) or {}
    job = resolve(JobConfig.from_dict(container))
    return job, SweepConfig.from_dict(sweep, job)


def typed_overrides() -> list[str]:
    """The command line's overrides (`key=value`, `group=option`) of the running Hydra app; [] outside one."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


class UserError(Exception):
    """A mistake in what the user asked for; its message is the one line the command ends with."""


def fail(message: str) -> None:
    """End the command: one line on stderr, exit status 2."""
    message = re.sub(r"[.;,]?\s*FIX THIS", "; FIX THIS", " ".join(message.split()), count=1)
    print(f"rayflow: {message}", file=sys.stderr)
    sys.exit(2)


def user_message(err: BaseException) -> str | None:
    """The one-line 'what; FIX THIS by how' of a user error, found anywhere in the exception's chain (Ray wraps
    a worker's or task's exception in its own), or None for a bug."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        for line in str(e).splitlines():
            if FIX in line:
                return re.sub(r"^(\w+\.)*\w+(Error|Exception): ", "", line.strip())
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list(getattr(e, "worker_failures", {}).values()) if isinstance(getattr(e, "worker_failures", None),
                                                                             dict) else []
    return None


def run_or_exit(fn: Callable, *args: Any) -> Any:
    """fn(*args); a user error anywhere inside ends the command with its one line and exit status 2."""
    try:
        return fn(*args)
    except (ConfigError, UserError) as e:
        fail(str(e))
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        fail(message)


def _hydra_message(err: Exception) -> str:
    from omegaconf.errors import ConfigTypeError, ValidationError

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = " ".join(lines)
    cause, key = err.__cause__, getattr(err.__cause__, "full_key", None)
    if isinstance(cause, ValidationError) and key:  # a value the typed schema (rayflow/config/) cannot take
        what = str(cause).splitlines()[0]
        return (f"config key '{key}' is invalid: {what}; FIX THIS by giving {key} a value of its type "
                "(`--cfg job` prints every key with its default)")
    if isinstance(cause, ConfigTypeError) and "deletion" in str(cause) and key:
        return (f"config key '{key}' cannot be deleted (every key of the typed config has a default); FIX THIS "
                f"by setting it instead: {key}=VALUE")
    if "Available options in" in text:
        i = next(i for i, ln in enumerate(lines) if ln.startswith("Available options in"))
        options = [ln for ln in lines[i + 1:] if not ln.startswith(("Config search path", "provider="))]
        return f"{lines[0]}; FIX THIS by choosing one of: {', '.join(options)}"
    if "To append to your config use" in text:
        key = re.search(r"Could not override '([^']+)'", text)
        return (f"unknown config key '{key.group(1) if key else lines[0]}'; FIX THIS by checking its spelling "
                "(`--cfg job` prints every key), or adding it with +key=value inside a free-form mapping (teacher.net, "
                "sweep.space)")
    return f"{lines[0] if lines else err}; FIX THIS by correcting the command-line override (key=value)"


def force_add(arg: str) -> str:
    """`+section.key=value` -> `++section.key=value` (add, or set if present). Before the dataclasses were Hydra's
    schema, keys a YAML file left out had to be added with `+` (the unknown-key error says so); they are all
    present now, where Hydra's `+` refuses an existing key. Group selections (`+teacher=edm`) and hydra.* stay."""
    return "+" + arg if re.match(r"\+(?!hydra\.)[A-Za-z_][\w-]*(\.[\w-]+)+=", arg) else arg


def check_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config with the command line's overrides before Hydra runs, so that an unknown key, a missing
    config choice or an unparsable override ends in one line (Hydra's own report is several, exit 1)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in argv):
        return  # Hydra's own flags (--multirun, --cfg job, --help, ...): Hydra's own handling
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(_hydra_message(e))


def entry_point(config_name: str) -> Callable:
    """`@entry_point("config")` on `main(cfg)`: Hydra's main with overrides checked first and user errors as
    one line."""

    def wrap(fn: Callable[[DictConfig], None]) -> Callable[[], None]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> None:
            run_or_exit(fn, cfg)

        hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task)

        @functools.wraps(fn)
        def main() -> None:
            sys.argv[1:] = [force_add(a) for a in sys.argv[1:]]
            check_overrides(config_name, sys.argv[1:])
            hydra_main()

        return main

    return wrap
