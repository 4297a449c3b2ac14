"""Compose the command line's overrides before Hydra runs the job.

Why: Hydra reports composition mistakes (an unknown group option or key) itself, in several
lines with exit code 1, before ``train`` is called; and it accepts ``+optimzer.lr=0.1`` as a new
key while ``optimizer.lr`` keeps its default. Composing the same overrides with Hydra's compose
API first turns each mistake into shiftlab's one-line error (exit 2) naming the key, the allowed
values and the nearest known key.
"""
from __future__ import annotations

import difflib
import itertools
import math
import re
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, open_dict

from shiftlab.trainers.compose import hydra_context
from shiftlab.trainers.config_checks import ConfigError

# A sweep expands into at most this many jobs composed one by one; bigger sweeps are checked one
# swept value at a time (the other overrides at their first value).
MAX_SWEEP_JOBS = 16
# difflib ratio above which a new key added with `+` counts as a typo of an existing one.
TYPO_CUTOFF = 0.8


def _split(line: str) -> tuple[str, str]:
    key, _, value = line.partition("=")
    return key, value


def _known(names: Sequence[str]) -> list[str]:
    return sorted(n for n in names if not str(n).startswith("_"))


def _groups(prefix: str = "") -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return [g for g in loader.list_groups(prefix) if g != "hydra"]


def _options(group: str) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader().get_group_options(group)


def _nearest(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    hit = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return hit[0] if hit else None


def _compose(name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose

    return compose(config_name=name, overrides=list(overrides), return_hydra_config=True)


def _unknown_key_error(name: str, overrides: list[str], line: str, key: str) -> ConfigError:
    """``key`` (dotted) is not in the config: list the keys allowed where it went wrong."""
    bare, value = _split(line)
    try:
        base = _compose(name, [o for o in overrides if o != line])
    except Exception:  # noqa: BLE001 - another override is broken too; report this one plainly
        base = None
    node, parts, done = base, key.split("."), []
    for part in parts:
        if isinstance(node, DictConfig) and part in node:
            node, done = node[part], done + [part]
            continue
        break
    where = ".".join(done)
    siblings = _known(list(node.keys())) if isinstance(node, DictConfig) else []
    if not done:
        siblings = sorted(set(siblings) - {"hydra"} | set(_groups()))
    wrong = parts[len(done)] if len(done) < len(parts) else parts[-1]
    near = _nearest(wrong, siblings)
    hint = ""
    if near is not None:
        fixed = ".".join(done + [near] + parts[len(done) + 1:])
        hint = f"; did you mean {fixed}={value}?"
    scope = f"keys of {where}" if where else "top-level keys and groups"
    return ConfigError(f"{bare}={value} is not allowed; allowed: {scope}: {', '.join(siblings) or 'none'}{hint}")


def _group_error(group: str, option: str, overrides: list[str]) -> ConfigError:
    options = _options(group)
    same = [o for o in overrides if _split(o)[0].lstrip("+~").split("@")[0] == group]
    line = next((o for o in reversed(same) if option in _split(o)[1]), same[-1] if same else None)
    shown = f"{_split(line)[0]}={_split(line)[1]}" if line else f"{group}={option}"
    near = _nearest(option, options)
    hint = f"; did you mean {group}={near}?" if near else ""
    return ConfigError(f"{shown} is not allowed; allowed: {', '.join(options)}{hint}")


def _explain(e: Exception, name: str, overrides: list[str]) -> ConfigError:
    """Hydra's composition error as one ConfigError naming the override."""
    from hydra.errors import MissingConfigException, OverrideParseException

    msg = str(e)
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    if isinstance(e, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for line in overrides:
            try:
                parser.parse_overrides([line])
            except Exception:  # noqa: BLE001
                key, value = _split(line)
                return ConfigError(f"{key}={value} is not allowed; allowed: a value in Hydra's override "
                                   f"grammar ({first})")
    m = re.search(r"Could not find '([^']+)'", msg)
    if isinstance(e, MissingConfigException) and m and "/" in m.group(1):
        group, _, option = m.group(1).rpartition("/")
        return _group_error(group, option, overrides)
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        line = next((o for o in overrides if _split(o)[0].lstrip("+~") == key), f"{key}=")
        if "@" in key:
            return ConfigError(f"{_split(line)[0]}={_split(line)[1]} is not allowed; allowed: a group of the "
                               f"defaults list without @package, or +{key}=... to add it ({first})")
        return _unknown_key_error(name, overrides, line, key)
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:
        key, value = _split(m.group(1))
        return ConfigError(f"{key}={value} is not allowed; allowed: one value ([a,b] for a list, "
                           "-m to sweep over the values)")
    m = re.search(r"Multiple values for (\S+?)\.", msg)
    if m:
        group = m.group(1)
        line = next((o for o in overrides if _split(o)[0].lstrip("+") == group), f"+{group}=")
        key, value = _split(line)
        return ConfigError(f"{key}={value} is not allowed; allowed: {group}={value} (the group is already in "
                           f"the defaults list; options: {', '.join(_options(group))})")
    mentioned = next((o for o in overrides if _split(o)[0].lstrip("+~") in msg), None)
    if mentioned:
        key, value = _split(mentioned)
        return ConfigError(f"{key}={value} is not allowed; allowed: an override Hydra can compose ({first})")
    return ConfigError(f"overrides={' '.join(overrides)} is not allowed; allowed: overrides Hydra can compose "
                       f"({first})")


def _target_params(node: DictConfig) -> set[str] | None:
    """Argument names of ``node._target_`` (its class and the bases it forwards ``**kwargs`` to)."""
    from shiftlab.trainers.config_targets import _locate, _params

    fn = _locate(str(node["_target_"]))
    return _params(fn)[0] if fn is not None else None


def check_additions(base: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse ``+key=value`` / ``++key=value`` where a new key sits next to a close known one
    (``+optimzer.lr=0.1``) and is no argument of the node's ``_target_``."""
    for line in overrides:
        key, value = _split(line)
        if not key.startswith("+") or "/" in key or "@" in key:
            continue
        parts = key.lstrip("+").split(".")
        if parts[0] == "hydra":
            continue
        node, done = base, []
        for part in parts:
            if isinstance(node, DictConfig) and part in node:
                node, done = node[part], done + [part]
                continue
            siblings = _known(list(node.keys())) if isinstance(node, DictConfig) else []
            if not done:
                siblings = sorted(set(siblings) - {"hydra"} | set(_groups()))
            near = _nearest(part, [s for s in siblings if s != part], TYPO_CUTOFF)
            params = _target_params(node) if isinstance(node, DictConfig) and "_target_" in node else None
            if near is not None and not (params and part in params):
                fixed = ".".join(done + [near] + parts[len(done) + 1:])
                raise ConfigError(f"{key}={value} is not allowed; allowed: {fixed}={value} ({part!r} looks like "
                                  f"a typo of the existing {near!r}; a new key needs a name not this close)")
            break


def _value_only(key: str) -> bool:
    """Whether a swept key's values cannot change whether a job composes: a plain change of a config
    value (not a group choice, not an addition or deletion, not Hydra's own typed node). Such a key
    composes with every value or with none (shiftlab's configs are untyped YAML); its values are
    range-checked per job when the job runs, as every multirun job's values are."""
    if key[:1] in "+~" or "/" in key or "@" in key or key.split(".")[0] == "hydra":
        return False
    return "." in key or not _options(key)


def sweep_jobs(overrides: Sequence[str], collapse_values: bool = False) -> list[list[str]]:
    """The override lists of the jobs Hydra's basic sweeper would run (a sample when many).

    ``collapse_values``: a swept key that only changes a value (:func:`_value_only`, e.g. ``seed=0,1,...,7``)
    keeps its first value only; what is left is what composition can tell apart (a seed sweep's eight jobs
    compose alike: composing each cost ~0.25 s per job before any trained). Needs Hydra initialised."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    columns: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override() and o.is_discrete_sweep():
            key = o.get_key_element()
            values = [f"{key}={v}" for v in o.sweep_string_iterator()]
            columns.append(values[:1] if collapse_values and _value_only(key) else values)
        elif not o.is_sweep_override():  # interval sweeps belong to other sweepers
            columns.append([o.input_line])
    if math.prod(len(c) for c in columns) <= MAX_SWEEP_JOBS:
        return [list(job) for job in itertools.product(*columns)]
    firsts = [c[0] for c in columns]
    jobs = [firsts]
    for i, col in enumerate(columns):
        jobs += [firsts[:i] + [v] + firsts[i + 1:] for v in col[1:]]
    return jobs


def compose_checked(name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose like ``shiftlab-train`` would, raising ConfigError for composition mistakes."""
    overrides = list(overrides)
    try:
        cfg = _compose(name, overrides)
    except Exception as e:  # noqa: BLE001 - every Hydra composition error becomes one line
        raise _explain(e, name, overrides) from None
    additions = [o for o in overrides if o.startswith("+")]
    if additions:
        try:
            base = _compose(name, [o for o in overrides if not o.startswith("+")])
        except Exception:  # noqa: BLE001 - other overrides build on the new keys; nothing to compare
            base = None
        if base is not None:
            check_additions(base, additions)
    return cfg


def check_search_needs_sweep(overrides: Sequence[str], multirun: bool) -> None:
    """``-m hparams_search=<name>`` is refused: Hydra's basic sweeper does not read the search's
    ``sweep.params`` and would quietly run one job; the search runs through ``shiftlab-sweep``."""
    line = next((o.lstrip("+") for o in overrides if _split(o)[0].lstrip("+") == "hparams_search"), None)
    if multirun and line is not None and _split(line)[1] not in ("", "null"):
        raise ConfigError(f"{line} is not allowed with -m; allowed: shiftlab-sweep {line} [overrides...] "
                          "(shiftlab-train -m would run one job: Hydra's sweeper ignores sweep.params)")


def preflight(argv: Sequence[str], config_dir: str, config_name: str = "train") -> None:
    """Check the command line ``argv`` before Hydra runs; raise ConfigError on the first mistake.

    A single run is composed and range-checked (nothing is built, no run directory made yet). A
    multirun has each job's composition checked (jobs that differ only in swept values, not in group
    choices, compose alike and are checked once: :func:`sweep_jobs`); value errors stay per job (that
    job fails, the sweep continues).
    """
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    if (args.help or args.hydra_help or args.shell_completion or args.info or args.config_path
            or args.config_dir or getattr(args, "experimental_rerun", None)):
        return
    name = args.config_name or config_name
    overrides = list(args.overrides)
    check_search_needs_sweep(overrides, args.multirun)
    if args.multirun and any(o.split("=", 1)[0] in ("hydra/sweeper", "+hydra/sweeper") for o in overrides):
        return  # another sweeper expands the overrides its own way
    with hydra_context(config_dir):
        if args.multirun:
            try:
                jobs = sweep_jobs(overrides, collapse_values=True)
            except Exception as e:  # noqa: BLE001 - an override Hydra cannot parse
                raise _explain(e, name, overrides) from None
            for job in jobs:
                try:
                    compose_checked(name, job)
                except ConfigError as e:
                    raise ConfigError(f"{e} (in the sweep's job: {' '.join(job)})") from None
            return
        cfg = compose_checked(name, overrides)
    from shiftlab.trainers.config_checks import check_config
    from shiftlab.trainers.extensions import load_extensions

    with open_dict(cfg):
        cfg.pop("hydra", None)
    load_extensions(cfg.get("imports") or ())  # a user's registered names exist before they are checked
    check_config(cfg)


def run_cli(hydra_main: Callable[[], Any], config_dir: str, config_name: str = "train") -> None:
    """The entry points' shared start: the working directory is importable (as for ``python -m``: a user's
    ``_target_`` or ``imports`` entry needs no PYTHONPATH); the command line is composed and checked before
    Hydra runs (Hydra would report composition mistakes itself, in several lines with exit 1, and value errors
    only after the run directory exists); a mistake is one line on stderr and exit code 2."""
    import os
    import sys

    from shiftlab.trainers.extensions import ExtensionError

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        preflight(sys.argv[1:], config_dir, config_name=config_name)
    except (ConfigError, ExtensionError) as e:
        print(f"shiftlab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_main()
