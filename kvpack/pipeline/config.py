"""The workflow's configuration: validation, defaults, and what the rules derive from it.

One place for the rules of a valid config, used by ``workflow/rules/common.smk`` (at parse time,
before any job runs) and by the tests:

    cfg = validate_config(yaml.safe_load(open("config/config.yaml")))   # raises ConfigError
    for w in workloads(cfg): ...                                         # {name, T, D, dtype, seed}

The JSON schema (``workflow/schemas/config.schema.yaml``, Draft 2020-12) holds the keys, their
types, bounds and defaults; :func:`validate_config` fills the defaults in place (as
``snakemake.utils.validate`` does), reports *every* violation with the key it concerns, then adds
the checks a schema cannot express: integers written as floats, duplicate shapes or names, a GPU
requested on a machine without one, variants none of which runs on the chosen device, a reference
dir that does not exist or holds no records.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """An invalid configuration; the message names each offending key and the reason."""


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return SCHEMA_PATH.read_text()


def load_schema() -> dict:
    """The config schema (a fresh copy: defaults are inserted into configs, never shared)."""
    return yaml.safe_load(_schema_text())


def _validator_class():
    from jsonschema import Draft202012Validator, validators

    # An integer is an int, not a float with a zero fraction: "D: 64.0" would become "64.0" in paths.
    strict_int = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, x: isinstance(x, int) and not isinstance(x, bool)
    )
    base = validators.extend(Draft202012Validator, type_checker=strict_int)
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(base, {"properties": set_defaults})


def key_path(path) -> str:
    """['grid', 0, 'T'] -> 'grid[0].T' (the key as a user finds it in the YAML file)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error) -> str:
    """One line per schema violation: the key, then the reason in words."""
    where = key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(repr(k) for k in extra)
        scope = f"{where}: unknown key" if error.absolute_path else "unknown top-level key"
        return f"{scope}{'s' if len(extra) > 1 else ''} {keys} (allowed: {', '.join(allowed)})"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"{where}: missing required key {missing!r}"
    if error.validator == "const" and error.absolute_path and error.absolute_path[-1] == "variants":
        return f"{where}: {error.instance!r} is neither 'all' nor a list of variant names"
    if error.validator == "minItems":
        n = error.validator_value
        return f"{where}: needs at least {n} item{'s' if n > 1 else ''}, got {len(error.instance)}"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        got = type(error.instance).__name__
        return f"{where}: {error.instance!r} is not of type {want} (it is a {got})"
    if error.validator == "pattern":
        pattern = error.validator_value
        return f"{where}: {error.instance!r} does not match {pattern!r} (lower-case letters, digits, . _ -)"
    return f"{where}: {error.message}"


def _schema_errors(config: dict) -> list[str]:
    validator = _validator_class()(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [_describe(e) for e in errors]


def _semantic_errors(config: dict) -> list[str]:
    from .. import ops

    problems = []
    shapes: dict[tuple[int, int], int] = {}
    names: dict[str, int] = {}
    for i, entry in enumerate(config["grid"]):
        shape = (entry["T"], entry["D"])
        if shape in shapes:
            problems.append(
                f"grid[{i}]: shape T={shape[0]}, D={shape[1]} repeats grid[{shapes[shape]}] "
                "(one entry per shape; list several dtypes in its 'dtypes' instead)"
            )
        shapes.setdefault(shape, i)
        if entry["name"] in names:
            problems.append(f"grid[{i}].name: {entry['name']!r} is already the name of grid[{names[entry['name']]}]")
        names.setdefault(entry["name"], i)
    variants = config["variants"]
    if variants != "all":
        unknown = [v for v in variants if v not in ops.VARIANTS]
        if unknown:  # the schema's enum and kvpack.VARIANTS are kept equal by a test; this guards drift
            problems.append(f"variants: unknown {unknown}; known: {list(ops.VARIANTS)}")
    unknown_g = [g for g in config["granularities"] if g not in ops.GRANULARITIES]
    if unknown_g:
        problems.append(f"granularities: unknown {unknown_g}; known: {list(ops.GRANULARITIES)}")
    return (problems + _decode_errors(config.get("decode") or {}) + _e2e_errors(config.get("e2e") or {})
            + _reference_dir_errors(config["reference_dirs"]))


def _e2e_errors(e2e: dict) -> list[str]:
    """What the schema cannot say about the e2e benchmark: the model's file, and compiled points on its grid."""
    from ..study.e2e import MODELS

    problems = []
    if "model" in e2e and not (MODELS / f"{e2e['model']}.json").exists():
        known = sorted(p.stem for p in MODELS.glob("*.json"))
        problems.append(f"e2e.model: no data/models/{e2e['model']}.json (known: {', '.join(known)})")
    for i, point in enumerate(e2e.get("compiled_points") or []):
        if "T" in e2e and "batch" in e2e and (point[0] not in e2e["T"] or point[1] not in e2e["batch"]):
            problems.append(f"e2e.compiled_points[{i}]: {point} is not a point of e2e.T x e2e.batch")
    return problems


REFERENCE_KINDS = ("benchmark", "accuracy", "decode", "e2e")  # the record folders a reference dir holds (docs/records.md)


def resolve_reference_dir(path) -> Path | None:
    """A reference dir as the workflow finds it (common.smk): relative paths in the working directory
    first, then in the checkout; None when neither is a directory."""
    for candidate in (Path(path), ROOT / path):
        if candidate.is_dir():
            return candidate
    return None


def _has_records(d: Path) -> bool:
    return any(any((d / kind).glob("*.json")) for kind in REFERENCE_KINDS)


def _reference_dir_errors(dirs) -> list[str]:
    """Each reference dir must exist and hold records: one dropped in silence (a typo) would take its
    GPU's rows out of the report without a word."""
    problems = []
    for i, entry in enumerate(dirs):
        d = resolve_reference_dir(entry)
        if d is None:
            where = Path(entry).parent
            siblings = [p for base in dict.fromkeys((Path(where), ROOT / where)) if base.is_dir()
                        for p in sorted(base.iterdir()) if p.is_dir() and _has_records(p)]
            existing = ", ".join(dict.fromkeys(str(where / p.name) for p in siblings)) or "none with records"
            looked = "" if Path(entry).is_absolute() else \
                f"; looked up in {Path.cwd()}" + ("" if Path.cwd().resolve() == ROOT else f" and in {ROOT}")
            problems.append(f"reference_dirs[{i}]: {entry} does not exist (typo?); existing beside it: {existing}{looked}")
        elif not _has_records(d):
            problems.append(f"reference_dirs[{i}]: {entry} holds no records (no {{{','.join(REFERENCE_KINDS)}}}/*.json, "
                            "the layout of results/{device}/; docs/records.md)")
    return problems


def _heads_error(key: str, pair) -> str | None:
    hq, hkv = pair
    if hq % hkv:
        return (f"{key}: q_heads {hq} is not a multiple of kv_heads {hkv} (each KV head serves q_heads / kv_heads "
                "query heads)")
    return None


def _decode_errors(decode: dict) -> list[str]:
    """What the schema cannot say about the decode grid: GQA groups, and head dimensions the fused kernel takes."""
    from ..decode_attention import HEAD_DIMS

    problems = []

    def head_dim(key, d):
        if d not in HEAD_DIMS:
            problems.append(f"{key}: {d} is not a head dimension the fused kernel takes ({', '.join(map(str, HEAD_DIMS))})")

    seen: dict[tuple, int] = {}
    for i, pair in enumerate(decode.get("heads", [])):
        if (e := _heads_error(f"decode.heads[{i}]", pair)):
            problems.append(e)
        if tuple(pair) in seen:
            problems.append(f"decode.heads[{i}]: {pair} repeats decode.heads[{seen[tuple(pair)]}]")
        seen.setdefault(tuple(pair), i)
    if "head_dim" in decode:
        head_dim("decode.head_dim", decode["head_dim"])
    extra = decode.get("extra_head_dims") or {}
    for i, d in enumerate(extra.get("head_dims", [])):
        head_dim(f"decode.extra_head_dims.head_dims[{i}]", d)
    if "heads" in extra and (e := _heads_error("decode.extra_head_dims.heads", extra["heads"])):
        problems.append(e)
    if "head_dim" in (decode.get("append_shape") or {}):
        head_dim("decode.append_shape.head_dim", decode["append_shape"]["head_dim"])
    acc = decode.get("accuracy") or {}
    if "head_dim" in acc:
        head_dim("decode.accuracy.head_dim", acc["head_dim"])
    if "heads" in acc and (e := _heads_error("decode.accuracy.heads", acc["heads"])):
        problems.append(e)
    return problems


def resolve_run_device(config: dict) -> str:
    """'cpu' or 'cuda': where this run's jobs will run.

    Without device_name, the device is probed here (the run fails at start if 'cuda' is asked for
    and no GPU is visible). With device_name set (a cluster whose submit host has no GPU), 'cuda'
    is trusted and each job resolves it again on its node; 'auto' is still resolved here.
    """
    from . import environment

    device = config["device"]
    if device == "cuda" and config.get("device_name"):
        return "cuda"
    try:
        return environment.resolve_device(device)
    except RuntimeError as e:
        raise ConfigError(
            f"invalid config:\n  - device: {e} "
            "(on a cluster whose submit host has no GPU, also set device_name)"
        ) from None


def device_slug(config: dict, device_kind: str | None = None) -> str:
    """The name of results/{device}/: config device_name, else kvpack.pipeline.environment.device_slug."""
    if config.get("device_name"):
        return config["device_name"]
    from . import environment

    return environment.device_slug(device_kind or resolve_run_device(config))


def validate_config(config: dict, *, check_device: bool = True) -> dict:
    """Check ``config`` against the schema and the semantic rules; fill defaults in place; return it.

    Raises :class:`ConfigError` listing every problem, each as ``key: reason``. With
    ``check_device`` the device is resolved too (device 'cuda' without a GPU is an error) and the
    chosen variants must include at least one that runs there.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"invalid config: expected a mapping of keys to values, got {type(config).__name__}")
    problems = _schema_errors(config)
    if not problems:
        problems = _semantic_errors(config)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
    if check_device:
        kind = resolve_run_device(config)
        from .. import ops

        runnable = ops.VARIANTS if kind == "cuda" else ops.CPU_VARIANTS
        if config["variants"] != "all" and not set(config["variants"]) & set(runnable):
            raise ConfigError(
                f"invalid config:\n  - variants: none of {config['variants']} runs on device {kind!r} "
                f"(there: {list(runnable)})"
            )
    return config


def load_config(*paths) -> dict:
    """Merge YAML files as snakemake merges --configfile (later files override keys, nested
    mappings merged, lists replaced) and validate the result."""
    merged: dict = {}
    for p in paths:
        _merge(merged, yaml.safe_load(Path(p).read_text()) or {})
    return validate_config(merged)


def _merge(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


# --- what the rules derive from a valid config ---------------------------------------------------

def workloads(config: dict) -> list[dict]:
    """Every job's workload, grid order then dtype order: {name, T, D, dtype, seed}."""
    out = []
    for entry in config["grid"]:
        for dtype in entry.get("dtypes") or config["dtypes"]:
            out.append(
                {"name": entry["name"], "T": entry["T"], "D": entry["D"], "dtype": dtype, "seed": config["seed"]}
            )
    return out


def find_workload(config: dict, T, D, dtype: str) -> dict:
    """The workload of one job, from its wildcards. A shape outside the grid (a target asked for by
    path) is allowed and named '{T}x{D}'."""
    T, D = int(T), int(D)
    for entry in config["grid"]:
        if (entry["T"], entry["D"]) == (T, D):
            return {"name": entry["name"], "T": T, "D": D, "dtype": dtype, "seed": config["seed"]}
    return {"name": f"{T}x{D}", "T": T, "D": D, "dtype": dtype, "seed": config["seed"]}


DECODE_JOB_KEYS = ("granularity", "warmup", "repeats", "seed", "copy_bytes", "page_sizes", "int4_group")


def job_settings(config: dict, stage: str) -> dict:
    """The settings dict of a job: config[stage] plus the run-wide keys (benchmark, accuracy); for the
    decode jobs (decode, decode_append, decode_accuracy) the keys of config decode that job reads."""
    common = {"seed": config["seed"], "variants": config["variants"], "granularities": list(config["granularities"])}
    if stage == "benchmark":
        return {**config["benchmark"], **common}
    if stage == "accuracy":
        serial = config["benchmark"]["cpu_serial_max_elements"]  # one knob bounds cpu_serial in both jobs
        return {**config["accuracy"], "cpu_serial_max_elements": serial, **common}
    if stage == "decode":  # what one decode point's job reads: not the grid, so a new point reruns no other
        return {k: config["decode"][k] for k in DECODE_JOB_KEYS}
    if stage == "decode_append":
        return {**{k: config["decode"][k] for k in DECODE_JOB_KEYS if k not in ("page_sizes", "int4_group")},
                "append_shape": dict(config["decode"]["append_shape"])}
    if stage == "decode_accuracy":
        return {**config["decode"]["accuracy"], "granularity": config["decode"]["granularity"]}
    if stage == "e2e":  # what one e2e job reads (its T comes from the job): not the list of Ts
        return {k: v for k, v in config["e2e"].items() if k not in ("enabled", "T")}
    raise ValueError("stage must be 'benchmark', 'accuracy', 'decode', 'decode_append', 'decode_accuracy' or 'e2e', "
                     f"got {stage!r}")


def e2e_contexts(config: dict) -> list[int]:
    """The contexts T of the end-to-end benchmark, one job each ([] when e2e.enabled is false)."""
    return [int(t) for t in config["e2e"]["T"]] if config["e2e"]["enabled"] else []


def decode_points(config: dict) -> list[dict]:
    """The decode grid's points, one job each: {T, batch, q_heads, kv_heads, head_dim}."""
    from ..study.decode_step import grid_points

    return grid_points(config["decode"])


__all__ = [
    "SCHEMA_PATH",
    "ConfigError",
    "decode_points",
    "device_slug",
    "e2e_contexts",
    "find_workload",
    "job_settings",
    "key_path",
    "load_config",
    "load_schema",
    "resolve_run_device",
    "validate_config",
    "workloads",
]
