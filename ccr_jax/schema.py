"""Config keys declared once: each key's default, what it means and what is valid.

Every config section is a mapping name -> `Key` (or a nested mapping for a
subsection). The defaults of `configs/default.py` are built from these
declarations (`defaults`), and validation derives from them (`problems`):
unknown keys (with the nearest valid one), wrong types, and values a key's
own check refuses. Registries (datasets, losses, index backends, strategies)
declare the keys of their own entries; `ccr_jax/run/config.py` assembles them.
Imports nothing of ccr_jax.
"""

import dataclasses
import difflib
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  Attributes:
    default: its value when a config does not set it (an
      `ml_collections.FieldReference` for a key whose default is None but
      whose overrides have a type, e.g. a list).
    doc: what it means, in a line (shown in docs and errors).
    check: value -> None when valid, else what a valid value is (e.g.
      "an integer >= 1"); None accepts any value of the default's type.
  """
  default: Any
  doc: str
  check: Callable[[Any], str | None] | None = None


Schema = Mapping[str, "Key | Schema"]


def defaults(schema: Schema) -> ml_collections.ConfigDict:
  """A ConfigDict of every key's default, nested as the schema is."""
  out = ml_collections.ConfigDict()
  for name, key in schema.items():
    out[name] = defaults(key) if not isinstance(key, Key) else key.default
  return out


_MAPPINGS = (Mapping, ml_collections.ConfigDict)


def complete(schema: Schema, config: Mapping) -> ml_collections.ConfigDict:
  """`config` with every key the schema declares and it lacks set to its
  default: what a workdir's config.json written by older code needs before
  the code reads it. Keys the schema does not declare are kept as given."""
  out = ml_collections.ConfigDict()
  for name, key in schema.items():
    if name not in config:
      out[name] = defaults(key) if not isinstance(key, Key) else key.default
    elif isinstance(key, Key) or not isinstance(config[name], _MAPPINGS):
      out[name] = config[name]
    else:
      out[name] = complete(key, config[name])
  for name in config:
    if name not in schema:
      out[name] = config[name]
  return out


def key_paths(schema: Schema, prefix: str = "") -> list[str]:
  """Every dotted key the schema declares, sections included ('data', 'data.name')."""
  out = []
  for name, key in schema.items():
    out.append(prefix + name)
    if not isinstance(key, Key):
      out += key_paths(key, prefix + name + ".")
  return out


def describe(schema: Schema, config: Mapping, prefix: str = "") -> list[str]:
  """One line per key of `config`: `dotted.key = value  # doc`, and the
  default where the value differs from it (the resolved config, readable).

  Keys the schema does not declare (free-form sections) get no comment.
  """
  out = []
  for name, value in config.items():
    key = schema.get(name) if isinstance(schema, Mapping) else None
    if isinstance(value, Mapping):
      sub = key if isinstance(key, Mapping) else {}
      out += describe(sub, value, prefix + name + ".")
      continue
    line = f"{prefix}{name} = {value!r}"
    if isinstance(key, Key):
      default = key.default
      if isinstance(default, ml_collections.FieldReference):
        default = default.get()
      if isinstance(default, tuple):
        default = list(default)
      changed = "" if default == value else f" (default {default!r})"
      line += f"  # {key.doc}{changed}"
    out.append(line)
  return out


def render_python(schema: Schema, header: str) -> str:
  """Python source of a module whose `get_config()` returns `defaults(schema)`,
  each `section.key = value` line under a comment of what it means: the
  defaults readable, and loadable without importing whatever declares them
  (JAX for most sections). `header` is the module's docstring."""
  lines = [f'"""{header}"""', "", "import ml_collections", "", "",
           "def get_config() -> ml_collections.ConfigDict:",
           '  """Every config key at its default."""',
           "  config = ml_collections.ConfigDict()"]

  def walk(section: Schema, path: str) -> None:
    for name, key in section.items():
      target = f"{path}.{name}"
      if not isinstance(key, Key):
        lines.extend(["", f"  {target} = ml_collections.ConfigDict()"])
        walk(key, target)
        continue
      value = key.default
      if isinstance(value, ml_collections.FieldReference):
        # None with a type, so that an override of that type is accepted.
        value = (f"ml_collections.FieldReference({value.get()!r}, "
                 f"field_type={value.get_type().__name__})")
      else:
        value = repr(value)
      lines.extend(textwrap.wrap(key.doc, 88, initial_indent="  # ",
                                 subsequent_indent="  # "))
      lines.append(f"  {target} = {value}")

  walk(schema, "config")
  lines.append("  return config")
  return "\n".join(lines) + "\n"


def variant_options(arg: str | None, valid: tuple[str, ...], source: str) -> set[str]:
  """The comma-separated variant options of a config file's `get_config(arg)`.

  Raises:
    ValueError: an option not in `valid`, naming `source` (the config file).
  """
  options = set((arg or "").split(",")) - {""}
  unknown = options - set(valid)
  if unknown:
    raise ValueError(f"{source}: unknown options {sorted(unknown)}; valid: "
                     f"{', '.join(repr(v) for v in valid)} (comma-separated).")
  return options


def nearest_key_hint(key: str, valid: list[str]) -> str:
  """' Did you mean ...?' naming the valid key nearest to a mistyped one, or ''."""
  section, _, leaf = key.rpartition(".")
  # The same section first: 'train.stepz' means train.steps_per_task, not the
  # globally closer string 'pretrain.steps'.
  siblings = {v.rpartition(".")[2]: v for v in valid if v.rpartition(".")[0] == section}
  close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1,
                                                          cutoff=0.6)]
  if not close:  # Typos at the end of a long key ("steps_per_tsak").
    close = [v for name, v in siblings.items() if name.startswith(leaf[:4])][:1]
  if not close:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
  return f" Did you mean '{close[0]}'?" if close else ""


def _type_problem(value: Any, default: Any) -> str | None:
  if isinstance(default, ml_collections.FieldReference):
    default = default.get()
  if default is None:  # No type to hold the value to.
    return None
  if isinstance(default, bool):
    return None if isinstance(value, bool) else "true or false"
  if isinstance(default, int):
    return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
  if isinstance(default, float):
    return (None if isinstance(value, (int, float)) and not isinstance(value, bool)
            else "a number")
  if isinstance(default, str):
    return None if isinstance(value, str) else "a string"
  if isinstance(default, (list, tuple)):
    return None if isinstance(value, (list, tuple)) else "a list, e.g. '(1, 2)'"
  return None


def problems(schema: Schema, config: Mapping, prefix: str = "",
             free_form: tuple[str, ...] = ()) -> list[str]:
  """What is wrong with `config` under `schema`, one line per problem.

  Args:
    config: a (nested) mapping, e.g. `json.loads(config_dict.to_json())`.
    prefix: the dotted path of `schema` in the whole config ('strategy.').
    free_form: dotted keys whose values are user mappings checked elsewhere
      (e.g. 'data.categories': task name -> categories).
  Returns:
    Lines such as "unknown config key 'train.step'. Did you mean
    'train.steps_per_task'?" or "--config.train.batch_size=0 must be an
    integer >= 1." (empty when the config is valid).
  """
  valid = [prefix + k for k in key_paths(schema)]
  out = []
  for name, value in config.items():
    path = prefix + name
    key = schema.get(name)
    if key is None:
      out.append(f"unknown config key '{path}'.{nearest_key_hint(path, valid)}")
    elif not isinstance(key, Key):
      if isinstance(value, Mapping):
        out += problems(key, value, path + ".", free_form)
      else:
        out.append(f"--config.{path}={value!r} must be a section of keys "
                   f"({', '.join(sorted(key))}).")
    elif path in free_form:
      continue
    else:
      expected = _type_problem(value, key.default)
      if expected is None and key.check is not None:
        expected = key.check(value)
      if expected is not None:
        out.append(f"--config.{path}={value!r} must be {expected}.")
  return out


# Checks shared by many keys: each returns None (valid) or what a valid value is.


def at_least(low: float, integer: bool = False) -> Callable[[Any], str | None]:
  """A number >= low (an integer when `integer`)."""
  def check(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= low
    ok = ok and (isinstance(v, int) or not integer)
    return None if ok else f"{'an integer' if integer else 'a number'} >= {low}"
  return check


def greater_than(low: float) -> Callable[[Any], str | None]:
  """A number > low."""
  return lambda v: None if v > low else f"a number > {low}"


def fraction(v: Any) -> str | None:
  """A number in [0, 1]."""
  return None if 0 <= v <= 1 else "a fraction in [0, 1]"


def one_of(options) -> Callable[[Any], str | None]:
  """One of `options` (a collection, or a function returning one, read late so
  that a registry filled after this check was declared is seen whole)."""
  def check(v):
    valid = options() if callable(options) else options
    return None if v in valid else f"one of {sorted(valid)}"
  return check
