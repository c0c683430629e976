"""Configs: a bad key, value or file is one line and exit 2; a workdir's
config.json is a config; configs/defaults.py is the schema rendered and
configs load without JAX; every shipped config validates."""

import os
import subprocess
import sys

import ml_collections
import pytest

from ccr_jax import schema
from ccr_jax.run import config as config_lib
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/default.py:tiny"


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "ccr_jax.main", *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # A CLI subprocess each (~9 s).
@pytest.mark.parametrize("flag, message", [
    ("--config.train.stepz=3", "--config.train.stepz is not a config key. "
     "Did you mean 'train.steps_per_task'?"),
    ("--config.optim.learning_rate=-0.1", "learning_rate=-0.1 must be a number >= 0"),
    ("--config.eval.ks=()", "eval.ks=[] must be a non-empty list"),
    ("--config.loss.name=vse", "must be one of ['infonce', 'siglip', 'vse0', 'vse_pp']"),
    ("--config.strategy.name=ewcc", "valid components"),
    ("--config.data.name=cocoo", "must be one of ['coco', 'flickr30k', 'precomputed'"),
    ("--config.train.batch_size=abc", "invalid literal for int()"),
    ("--config.train.batch_size=0", "batch_size=0 must be an integer >= 1"),
])
def test_bad_config_is_one_clear_line_and_exit_2(flag, message, tmp_path):
  proc = _cli(TINY, f"--workdir={tmp_path}", flag)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  # Nothing was written: the error comes before any work.
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # A CLI subprocess each.
@pytest.mark.parametrize("config, message", [
    ("configs/defualt.py", "no file configs/defualt.py (Python files there: "),
    ("configs/default.py:tny", "unknown options ['tny']; valid: 'pretrained', 'tiny'"),
    ("{tmp}/broken.py", "SyntaxError: '(' was never closed"),
    ("{tmp}/nothing/config.json", "no file {tmp}/nothing/config.json"),
])
def test_config_that_does_not_load_is_one_line_and_exit_2(config, message, tmp_path):
  # Issue 25 D5: ml_collections deferred these to a 13-39 line chained traceback.
  (tmp_path / "broken.py").write_text("x = (\n")
  config, message = (x.replace("{tmp}", str(tmp_path)) for x in (config, message))
  proc = _cli(f"--config={config}", f"--workdir={tmp_path}/w")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --config={config} does not load"), lines
  assert message in lines[0]
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow  # A CLI subprocess.
def test_help_exits_0():
  proc = _cli("--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--workdir" in proc.stdout


@pytest.mark.slow  # Two tiny runs.
def test_a_workdir_config_json_is_a_config(tmp_path):
  # The advice a refused rerun gives: --config=<workdir>/config.json.
  workdir = str(tmp_path / "w")
  first = _cli(TINY, f"--workdir={workdir}")
  assert first.returncode == 0
  proc = _cli(TINY, f"--workdir={workdir}", "--config.optim.learning_rate=0.5")
  advice = f"--config={workdir}/config.json"
  assert proc.returncode == 2 and advice in proc.stderr, proc.stderr[-2000:]
  proc = _cli(advice, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Quiet: no TFDS prints for the local build, no Orbax notice per
  # read-only open on the resume.
  for noise in ("read only", "Downloading and preparing", "Unknown size"):
    assert noise not in first.stderr + first.stdout + proc.stderr + proc.stdout, noise
  proc = _cli("--mode=evaluate", f"--workdir={workdir}", TINY,
              "--config.train.steps_per_task=3")
  assert proc.returncode == 2 and "only --config.analysis.* applies" in proc.stderr


def test_config_file_typo_names_the_nearest_key():
  config = default.get_config("tiny")
  config.train.step_per_task = 3  # a typo in a user's config file
  with pytest.raises(ValueError, match="'train.step_per_task'. Did you mean "
                                       "'train.steps_per_task'"):
    config_lib.validate_config(config)


def test_every_shipped_config_validates_and_every_key_is_documented():
  import importlib  # pylint: disable=g-import-not-at-top
  for name, args in (("default", (None, "tiny")), ("secoco", (None,)),
                     ("sevige", (None,)), ("coco_vsepp", (None,)),
                     ("flickr30k_vsepp", (None,)), ("coco_precomp", (None, "secoco")),
                     ("f30k_precomp", (None,))):
    module = importlib.import_module(f"configs.{name}")
    for arg in args:
      config_lib.validate_config(module.get_config(arg))

  def undocumented(section, prefix=""):
    out = []
    for key, value in section.items():
      if isinstance(value, schema.Key):
        out += [] if len(value.doc) > 5 else [prefix + key]
      else:
        out += undocumented(value, prefix + key + ".")
    return out

  assert not undocumented(config_lib.config_schema())
  # The default config is the schema's defaults: one declaration per key.
  assert default.get_config().to_dict() == config_lib.default_config().to_dict()


def _field_types(config, prefix=""):
  """dotted key -> (its Python type, a FieldReference's declared type)."""
  out = {}
  for key in config.keys():
    field = config._fields[key]  # pylint: disable=protected-access
    if isinstance(field, ml_collections.ConfigDict):
      out.update(_field_types(field, prefix + key + "."))
    else:
      typed = isinstance(field, ml_collections.FieldReference)
      out[prefix + key] = (type(field), field.get_type() if typed else None)
  return out


def test_configs_defaults_py_is_the_schema_rendered():
  # Issue 25: configs/defaults.py shows every value without importing JAX;
  # it is a rendering of the declarations, so it must be regenerated when
  # they change (the message says how).
  from configs import defaults  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "configs", "defaults.py")) as f:
    assert f.read() == schema.render_python(config_lib.config_schema(),
                                            config_lib.DEFAULTS_HEADER), (
        "configs/defaults.py is stale: python -m ccr_jax.run.config > configs/defaults.py")
  rendered, declared = defaults.get_config(), config_lib.default_config()
  assert rendered.to_json() == declared.to_json()
  # Typed None defaults stay typed (an override of a list must be accepted).
  assert _field_types(rendered) == _field_types(declared)


def test_configs_load_without_jax():
  shipped = ["default", "secoco", "sevige", "coco_vsepp", "flickr30k_vsepp",
             "coco_precomp", "f30k_precomp", "from_json"]
  code = ("import sys, importlib\n"
          f"for name in {shipped}:\n"
          "  importlib.import_module('configs.' + name)\n"
          "from configs import default\n"
          "default.get_config('pretrained,tiny')\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'flax', 'optax', 'orbax', 'tensorflow', 'tensorflow_datasets', "
          "'scann', 'grain')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]"
