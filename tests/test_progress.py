"""Progress bar and live scalars: when the bar shows, what the logs hold."""

import glob
import io
import json
import os
import re
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tqdm
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2

from ccr_jax import progress
from ccr_jax import sharding
from ccr_jax import strategies
from ccr_jax import train as train_lib


class _Terminal(io.StringIO):
  """A stream that says it is a terminal."""

  def isatty(self):
    return True


def _crc32c(data: bytes) -> int:
  # Castagnoli CRC, bit by bit: slow but independent of tensorboardX's table.
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(logdir: str) -> list[event_pb2.Event]:
  """Every Event in a TensorBoard logdir, files in name order, CRCs checked."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
      assert length_crc == _masked_crc(header), path
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      assert body_crc == _masked_crc(body), path
      events.append(event_pb2.Event.FromString(body))
      pos += 16 + length
  return events


def _event_scalars(events) -> dict[str, list[tuple[int, float]]]:
  out = {}
  for e in events:
    for v in e.summary.value:
      if v.WhichOneof("value") == "simple_value":  # Not hparams or text records.
        out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out


def _counting_step(state, batch):
  """A train step whose metrics are known: loss = 10 * step + 1, aux = step."""
  del batch
  return state + 1, {"loss": 10.0 * state + 1.0, "aux": state * 1.0}


def _run(step_fn, tmp_path, *, first_step=0, num_steps=5, log_every=2, task=1,
         state=None, **kwargs):
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = jnp.float32(first_step) if state is None else state
  return train_lib.train_task(
      state, step_fn, lambda s: {"x": np.zeros((3,), np.float32)},
      first_step=first_step, num_steps=num_steps, mesh=mesh, checkpoint_every=0,
      checkpoint_fn=lambda s, n, ranked: None, log_every=log_every, task=task, **kwargs)


# ---------------------------------------------------------------- progress bar


def test_bar_keeps_loss_and_rate_within_a_narrow_terminal():
  bar = progress.task_progress(2, 150, 300, force=True, stream=_Terminal())
  progress.show_window(bar, 3.41234, 2310.4)
  wide = tqdm.tqdm.format_meter(**{**bar.format_dict, "ncols": 200})
  assert wide.startswith("task 2 step 150/300, loss 3.412, 2,310 pairs/s |")
  # Percentage, then elapsed<remaining ("?": no step timed yet).
  assert re.search(r"\|  50% \d\d:\d\d<\?$", wide), wide
  for width in (50, 80):
    line = tqdm.tqdm.format_meter(**{**bar.format_dict, "ncols": width})
    # tqdm cuts the line at the terminal width: what it cuts is the tail
    # (bar, ETA), never the loss or the rate, which come first.
    assert len(line) <= width
    assert "loss 3.412, 2,310 pairs/s" in line
  bar.close()


def test_log_line_names_loss_terms_diagnostics_rate_and_eta():
  terms = {"lwf_kl": 0.01234, "loss": 3.41234, "t2i": 1.7, "grad_norm": 1.25,
           "contrastive": 3.4, "i2t": 1.70004, "temperature": 0.07}
  line = progress.log_line(2, 150, 300, terms, 2310.4, 41.4)
  assert line == ("task 2  step 150/300  loss 3.412 (contrastive 3.4, i2t 1.7, "
                  "t2i 1.7, lwf_kl 0.01234)  grad_norm 1.25  temperature 0.07  "
                  "2,310 pairs/s  ETA 0:41")
  # A loss alone: no parentheses; no ETA when it is unknown.
  assert progress.log_line(1, 2, 4, {"loss": 94.349}, 594.6, None) == (
      "task 1  step 2/4  loss 94.35  595 pairs/s")


def test_format_duration():
  assert progress.format_duration(0) == "0:00"
  assert progress.format_duration(41.4) == "0:41"
  assert progress.format_duration(59.6) == "1:00"  # Rounded, then carried.
  assert progress.format_duration(3725) == "1:02:05"
  for unknown in (None, -1.0, float("inf"), float("nan")):
    assert progress.format_duration(unknown) == "?"


def test_progress_off_when_stdout_is_not_a_terminal(monkeypatch, capsys, tmp_path):
  monkeypatch.delenv("CI", raising=False)
  assert not progress.progress_enabled(io.StringIO())
  _run(_counting_step, tmp_path)
  # Not a terminal under capsys: the bar wrote nothing to either stream.
  out, err = capsys.readouterr()
  assert "task 1 step" not in out + err
  assert "pairs/s" not in out + err


def test_progress_on_for_a_terminal_shows_step_loss_rate_and_eta(monkeypatch, tmp_path):
  monkeypatch.delenv("CI", raising=False)
  terminal = _Terminal()
  monkeypatch.setattr("sys.stdout", terminal)
  assert progress.progress_enabled()
  _run(_counting_step, tmp_path)
  shown = terminal.getvalue()
  assert "task 1 step 5/5" in shown
  # Last window is step 4 alone: loss = 10 * 4 + 1.
  assert "loss 41," in shown
  assert "pairs/s" in shown
  assert "<00:00" in shown  # The ETA field ("remaining") at the end.


def test_ci_silences_a_terminal_unless_forced(monkeypatch, tmp_path):
  monkeypatch.setenv("CI", "true")
  assert not progress.progress_enabled(_Terminal())
  assert progress.progress_enabled(io.StringIO(), force=True)
  forced = io.StringIO()
  monkeypatch.setattr("sys.stdout", forced)
  _run(_counting_step, tmp_path, show_progress=True)
  assert "step 5/5" in forced.getvalue()
  monkeypatch.setenv("CI", "false")
  assert progress.progress_enabled(_Terminal())


def test_only_process_zero_shows_and_writes(monkeypatch, tmp_path):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert not progress.progress_enabled(_Terminal(), force=True)
  with progress.ScalarWriter(str(tmp_path)) as writer:
    assert not writer.active
    writer.write(1, {"a": 1.0})
    writer.resume_at(1)
    writer.write_config({"train": {"steps_per_task": 4}})
    writer.write_summary(_SUMMARY, 8)
  assert not os.path.exists(os.path.join(tmp_path, "logs"))


# --------------------------------------------------------------------- scalars


def _tiny_train_step():
  """The real train step and schedule of the tiny config, on random batches."""
  from configs import default
  from ccr_jax.models import dual_encoder
  cfg = default.get_config("tiny")
  steps = 5  # Windows of 2, 2 and 1 steps with log_every=2: a partial last one.
  model = dual_encoder.build_model(cfg.model, vocab_size=20)
  mesh = sharding.make_mesh(jax.devices()[:1])
  strategy = strategies.get_strategy(cfg.strategy)
  optimizer = train_lib.make_optimizer(cfg.optim, steps, strategy.transform)
  step = train_lib.make_train_step(model, optimizer, train_lib.make_loss(cfg.loss),
                                   mesh, strategy.loss_term)
  size, length, batch = cfg.data.image_size, 6, cfg.train.batch_size
  params = dual_encoder.init_params(model, jax.random.PRNGKey(0), (size, size, 3),
                                    length)
  state = train_lib.create_train_state(params, optimizer, mesh, step=steps)

  def batch_fn(s):
    rng = np.random.default_rng(s)
    return dict(images=rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
                tokens=rng.integers(1, 20, (batch, length)).astype(np.int32),
                lengths=rng.integers(2, length + 1, (batch,)).astype(np.int32),
                image_ids=np.arange(batch, dtype=np.int32))

  return cfg, steps, mesh, step, state, batch_fn


@pytest.mark.slow
def test_jsonl_and_tensorboard_hold_the_logged_window_means(tmp_path):
  cfg, steps, mesh, step, state, batch_fn = _tiny_train_step()
  per_step = []

  def recording_step(state, batch):
    state, metrics = step(state, batch)
    per_step.append(jax.device_get(metrics))  # The test's own sync, not the loop's.
    return state, metrics

  with progress.ScalarWriter(str(tmp_path)) as writer:
    train_lib.train_task(
        state, recording_step, batch_fn, first_step=0, num_steps=steps, mesh=mesh,
        checkpoint_every=0, checkpoint_fn=lambda s, n, ranked: None, log_every=2, task=2,
        writer=writer,
        learning_rate_fn=train_lib.learning_rate_schedule(cfg.optim, steps))

  got = progress.read_scalars(progress.scalars_path(str(tmp_path)))
  windows = [(0, 2), (2, 4), (4, 5)]
  global_steps = [steps + end for _, end in windows]  # Task 2 starts at step 5.
  assert set(per_step[0]) >= {"loss", "grad_norm", "contrastive"}
  assert set(got) == ({f"train/{k}" for k in per_step[0]}
                      | {"train/learning_rate", "perf/pairs_per_s"})
  for name in per_step[0]:
    want = [np.mean([float(per_step[i][name]) for i in range(a, b)], dtype=np.float64)
            for a, b in windows]
    series = got[f"train/{name}"]
    assert [s for s, _ in series] == global_steps
    # The loop sums float32 values on device before dividing on the host:
    # a few float32 roundings of a sum of <= 2 terms.
    np.testing.assert_allclose([v for _, v in series], want, rtol=1e-6, err_msg=name)
  # Decay after int(0.5 * 5) = 2 steps; each window records its last step's rate.
  lr = cfg.optim.learning_rate
  want_lr = [lr, lr * cfg.optim.decay_factor, lr * cfg.optim.decay_factor]
  np.testing.assert_allclose([v for _, v in got["train/learning_rate"]], want_lr,
                             rtol=1e-6)  # The schedule computes in float32.
  assert all(v > 0 for _, v in got["perf/pairs_per_s"])

  events = _read_events(progress.tensorboard_dir(str(tmp_path)))
  assert events[0].file_version == "brain.Event:2"
  board = _event_scalars(events)
  assert set(board) == set(got)
  for name, series in got.items():
    assert [s for s, _ in board[name]] == [s for s, _ in series], name
    # TensorBoard stores float32 (simple_value); the JSONL keeps float64.
    np.testing.assert_allclose([v for _, v in board[name]], [v for _, v in series],
                               rtol=1e-6, err_msg=name)


def test_resumed_task_replaces_what_the_killed_run_wrote(tmp_path):
  workdir = str(tmp_path)
  with progress.ScalarWriter(workdir) as writer:
    _run(_counting_step, tmp_path, num_steps=8, log_every=2, writer=writer)
  path = progress.scalars_path(workdir)
  # What a killed run leaves: a window after the checkpoint at step 4 with a
  # value the resumed run will not reproduce, and half a line.
  with open(path, "a") as f:
    f.write(json.dumps({"step": 5, "time": 0.0, "scalars": {"train/loss": -1.0}}) + "\n")
    f.write('{"step": 6, "time": 0.0, "scal')
  with progress.ScalarWriter(workdir) as writer:
    _run(_counting_step, tmp_path, first_step=4, num_steps=8, log_every=3,
         writer=writer)

  with open(path) as f:
    lines = f.read().splitlines()
  for line in lines:
    json.loads(line)  # The half line was cut, not glued to the next record.
  loss = dict(progress.read_scalars(path)["train/loss"])
  # First run: windows [0,2) [2,4) [4,6) [6,8); resumed: [4,6) [6,8) with
  # log_every=3 -> ends at 6 and 8. Losses are 10 * step + 1 averaged.
  assert loss == {2: 6.0, 4: 26.0, 6: 46.0, 8: 66.0}
  assert 5 not in loss  # The killed run's stale window is dropped.

  events = _read_events(progress.tensorboard_dir(workdir))
  restarts = [e.step for e in events if e.HasField("session_log")
              and e.session_log.status == event_pb2.SessionLog.START]
  assert restarts == [5]  # Steps >= 5 belong to the resumed run in TensorBoard.


def test_nested_scalars_are_flattened_to_slash_names(tmp_path):
  with progress.ScalarWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(8, {"recall": {"fixed": {"i2t": {"1": {"r1": np.float32(12.5)}}}}})
  got = progress.read_scalars(progress.scalars_path(str(tmp_path)))
  assert got == {"recall/fixed/i2t/1/r1": [(8, 12.5)]}
  assert not os.path.exists(progress.tensorboard_dir(str(tmp_path)))


_SUMMARY = {"fixed": {"task_aware": {
    "i2t_r1": {"final_average": 12.5, "average_incremental": 20.0,
               "forgetting": 7.5, "backward_transfer": None},
    "t2i_r1": {"final_average": 10.0, "average_incremental": 15.0,
               "forgetting": 2.5, "backward_transfer": -2.5}}}}


def test_config_and_summary_become_hparams_text_and_scalars(tmp_path):
  config = {"seed": 3, "train": {"steps_per_task": 4, "log_every": 2},
            "strategy": {"name": "lwf", "freeze": {"patterns": ["img/.*"]}},
            "eval": {"split": "test", "save_embeddings": False, "ks": [1, 5]},
            "data": {"categories": None}}
  workdir = str(tmp_path)
  with progress.ScalarWriter(workdir) as writer:
    writer.write_config(config)
    writer.write_summary(_SUMMARY, 8)

  want = {"summary/fixed/task_aware/i2t_r1/final_average": 12.5,
          "summary/fixed/task_aware/i2t_r1/average_incremental": 20.0,
          "summary/fixed/task_aware/i2t_r1/forgetting": 7.5,
          "summary/fixed/task_aware/t2i_r1/final_average": 10.0,
          "summary/fixed/task_aware/t2i_r1/average_incremental": 15.0,
          "summary/fixed/task_aware/t2i_r1/forgetting": 2.5,
          "summary/fixed/task_aware/t2i_r1/backward_transfer": -2.5}
  # backward_transfer None (i2t) is left out, not written as 0 or NaN.
  assert progress.read_scalars(progress.scalars_path(workdir)) == {
      k: [(8, v)] for k, v in want.items()}
  events = _read_events(progress.tensorboard_dir(workdir))
  assert _event_scalars(events) == {k: [(8, v)] for k, v in want.items()}

  plugin = {}  # tag -> (step, HParamsPluginData)
  text = None
  for e in events:
    for v in e.summary.value:
      if v.metadata.plugin_data.plugin_name == "hparams":
        plugin[v.tag] = (e.step, plugin_hparams_pb2.HParamsPluginData.FromString(
            v.metadata.plugin_data.content))
      elif v.metadata.plugin_data.plugin_name == "text":
        text = (v.tag, e.step, v.tensor.string_val[0].decode())
  assert set(plugin) == {"_hparams_/session_start_info", "_hparams_/experiment",
                         "_hparams_/session_end_info"}
  step, start = plugin["_hparams_/session_start_info"]
  hp = start.session_start_info.hparams
  assert step == 0
  assert hp["train.steps_per_task"].number_value == 4
  assert hp["seed"].number_value == 3
  assert hp["strategy.name"].string_value == "lwf"
  assert hp["eval.save_embeddings"].bool_value is False
  assert hp["eval.save_embeddings"].WhichOneof("kind") == "bool_value"
  # Lists and None as config.json writes them.
  assert hp["strategy.freeze.patterns"].string_value == '["img/.*"]'
  assert hp["eval.ks"].string_value == "[1, 5]"
  assert hp["data.categories"].string_value == "null"
  _, experiment = plugin["_hparams_/experiment"]
  assert ({h.name for h in experiment.experiment.hparam_infos}
          == set(progress.flatten_config(config)))
  assert {m.name.tag for m in experiment.experiment.metric_infos} == set(want)
  _, end = plugin["_hparams_/session_end_info"]
  assert end.session_end_info.status == 1  # STATUS_SUCCESS in api.proto.
  tag, step, body = text
  assert (tag, step) == ("config/text_summary", 0)
  # Indented four spaces (a markdown code block) around the config's JSON.
  assert json.loads("\n".join(line[4:] for line in body.splitlines())) == config


def test_summary_without_config_writes_scalars_but_no_experiment(tmp_path):
  with progress.ScalarWriter(str(tmp_path)) as writer:
    writer.write_summary(_SUMMARY, 4)
  events = _read_events(progress.tensorboard_dir(str(tmp_path)))
  # An experiment record with no hyperparameters would hide every run's
  # hyperparameters in TensorBoard's table: none is written.
  assert not [v for e in events for v in e.summary.value
              if v.metadata.plugin_data.plugin_name == "hparams"]
  assert _event_scalars(events)["summary/fixed/task_aware/i2t_r1/forgetting"] == [
      (4, 7.5)]


def test_flatten_config_dots_nested_keys_and_reads_configdicts():
  config = ml_collections.ConfigDict(
      {"seed": 0, "train": {"steps_per_task": 4, "opt": {"lr": 0.1}},
       "empty": {}, "ks": (1, 5)})
  assert progress.flatten_config(config) == {
      "seed": 0, "train.steps_per_task": 4, "train.opt.lr": 0.1, "ks": (1, 5)}


# ---------------------------------------------------------------------- reader


def _write_lines(path, lines, tail=""):
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines) + tail)


def test_reader_skips_a_truncated_last_line(tmp_path):
  path = str(tmp_path / "scalars.jsonl")
  _write_lines(path, [{"step": 1, "time": 0, "scalars": {"a": 1.0}},
                      {"step": 2, "time": 0, "scalars": {"a": 2.0, "b": 3.0}}],
               tail='{"step": 3, "time": 0, "scalars": {"a": 4')
  assert progress.read_scalars(path) == {"a": [(1, 1.0), (2, 2.0)], "b": [(2, 3.0)]}
  # A whole record without its newline was cut too: the writer cuts it.
  _write_lines(path, [{"step": 1, "time": 0, "scalars": {"a": 1.0}}],
               tail=json.dumps({"step": 2, "time": 0, "scalars": {"a": 9.0}}))
  assert progress.read_scalars(path) == {"a": [(1, 1.0)]}


def test_reader_rejects_damage_before_the_last_line(tmp_path):
  path = str(tmp_path / "scalars.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "time": 0, "scalars": {"a": 1.0}}\n{"step": 2, "ti\n'
            '{"step": 3, "time": 0, "scalars": {"a": 1.0}}\n')
  with pytest.raises(ValueError, match=":2 is not a JSON record"):
    progress.read_scalars(path)


def test_reader_keeps_the_last_value_per_step_and_name(tmp_path):
  path = str(tmp_path / "scalars.jsonl")
  _write_lines(path, [
      {"step": 2, "time": 0, "scalars": {"a": 1.0, "b": 5.0}},
      {"step": 4, "time": 0, "scalars": {"a": 2.0}},
      {"step": 2, "time": 0, "scalars": {"a": 7.0}},  # Rewritten after a resume.
      {"step": 3, "time": 0, "resume_at": True},
      {"step": 6, "time": 0, "scalars": {"a": 3.0}},
  ])
  # a@2 rewritten (last wins), b@2 kept (not rewritten, before the mark),
  # a@4 dropped by the mark at 3 (the resumed run never reached it).
  assert progress.read_scalars(path) == {"a": [(2, 7.0), (6, 3.0)], "b": [(2, 5.0)]}


def test_writer_cuts_a_partial_tail_of_any_length(tmp_path):
  path = progress.scalars_path(str(tmp_path))
  os.makedirs(os.path.dirname(path))
  record = json.dumps({"step": 1, "time": 0, "scalars": {"a": 1.0}}) + "\n"
  # Longer than the 64 KiB block the tail is searched in.
  with open(path, "w") as f:
    f.write(record + "x" * 70000)
  with progress.ScalarWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(2, {"a": 2.0})
  assert progress.read_scalars(path) == {"a": [(1, 1.0), (2, 2.0)]}
  with open(path, "w") as f:
    f.write("no newline at all")
  with progress.ScalarWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(3, {"a": 3.0})
  assert progress.read_scalars(path) == {"a": [(3, 3.0)]}
