"""Real-data towers: the ResNet image tower, the MiniLM text tower and its tokenizer.

Each tower is compared with an independent NumPy forward pass written here
from the published architectures, reading the weights in their original
(torch) layouts, so a wrong transposition, padding or name mapping in our
loaders fails the comparison.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from ccr_jax.data import text
from ccr_jax.models import dual_encoder
from ccr_jax.models import image_towers
from ccr_jax.models import minilm
from ccr_jax.models.dual_encoder import DualEncoder

DIM = 16


def zeros_like_shapes(shapes):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@jax.jit
def adam_step(params, grads):
  """One step of the train step's optimizer chain (clip, then Adam)."""
  optimizer = optax.chain(optax.clip_by_global_norm(2.0), optax.adam(1e-2))
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return optax.apply_updates(params, updates)


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------- ResNet

RESNET18_STAGES = ((64, 2), (128, 2), (256, 2), (512, 2))


def random_resnet18_state(seed):
  """A torchvision-layout resnet18 state_dict (fc and num_batches_tracked included)."""
  rng = np.random.default_rng(seed)
  state = {}

  def conv(key, out, cin, k):
    # He-scaled so activations stay O(1) through the network.
    state[key] = (rng.normal(size=(out, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
                  ).astype(np.float32)

  def bn(key, c):
    state[f"{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    state[f"{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    state[f"{key}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    state[f"{key}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    state[f"{key}.num_batches_tracked"] = np.array(7, np.int64)

  conv("conv1.weight", 64, 3, 7)
  bn("bn1", 64)
  cin = 64
  for stage, (width, blocks) in enumerate(RESNET18_STAGES, start=1):
    for b in range(blocks):
      prefix = f"layer{stage}.{b}"
      conv(f"{prefix}.conv1.weight", width, cin, 3)
      bn(f"{prefix}.bn1", width)
      conv(f"{prefix}.conv2.weight", width, width, 3)
      bn(f"{prefix}.bn2", width)
      if b == 0 and stage > 1:
        conv(f"{prefix}.downsample.0.weight", width, cin, 1)
        bn(f"{prefix}.downsample.1", width)
      cin = width
  state["fc.weight"] = rng.normal(size=(1000, 512)).astype(np.float32)
  state["fc.bias"] = np.zeros(1000, np.float32)
  return state


def np_conv(x, w, stride, pad):
  """torch Conv2d (no bias): x [N, C, H, W], w [O, C, kh, kw] -> [N, O, H', W']."""
  _, _, h, wd = x.shape
  kh, kw = w.shape[2:]
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
      out = out + np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out


def np_bn(x, state, key):
  shape = (1, -1, 1, 1)
  mean = state[f"{key}.running_mean"].reshape(shape)
  var = state[f"{key}.running_var"].reshape(shape)
  return ((x - mean) / np.sqrt(var + 1e-5) * state[f"{key}.weight"].reshape(shape)
          + state[f"{key}.bias"].reshape(shape))


def np_maxpool_3x3_s2_p1(x):
  n, c, h, w = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  return np.max([xp[:, :, i:i + 2 * oh:2, j:j + 2 * ow:2]
                 for i in range(3) for j in range(3)], axis=0)


def np_resnet18_features(images_uint8, state):
  """torchvision resnet18 up to avgpool, float64, on ImageNet-normalised pixels."""
  x = images_uint8.astype(np.float64) / 255.0
  x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
  s = {k: v.astype(np.float64) for k, v in state.items()}
  relu = lambda v: np.maximum(v, 0.0)
  x = relu(np_bn(np_conv(x, s["conv1.weight"], 2, 3), s, "bn1"))
  x = np_maxpool_3x3_s2_p1(x)
  for stage, (_, blocks) in enumerate(RESNET18_STAGES, start=1):
    for b in range(blocks):
      p = f"layer{stage}.{b}"
      stride = 2 if b == 0 and stage > 1 else 1
      y = relu(np_bn(np_conv(x, s[f"{p}.conv1.weight"], stride, 1), s, f"{p}.bn1"))
      y = np_bn(np_conv(y, s[f"{p}.conv2.weight"], 1, 1), s, f"{p}.bn2")
      if f"{p}.downsample.0.weight" in s:
        x = np_bn(np_conv(x, s[f"{p}.downsample.0.weight"], stride, 0), s,
                  f"{p}.downsample.1")
      x = relu(x + y)
  return x.mean(axis=(2, 3))


def resnet_config(**overrides):
  fields = dict(image_tower="resnet18", text_tower="gru", embed_dim=DIM, word_dim=8,
                resnet_weights="", freeze_backbone=False)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  state = random_resnet18_state(0)
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.npz")
  np.savez(path, **state)
  return path, state


@pytest.fixture(scope="module")
def resnet18_params(resnet18_file):
  """A resnet18 + GRU dual encoder's params, the backbone from the file."""
  path, _ = resnet18_file
  config = resnet_config(resnet_weights=path)
  model = dual_encoder.build_model(config, vocab_size=30)
  # Zeros in the init's tree stand in for an init (slow on CPU for a ResNet);
  # load_pretrained only needs the tree.
  shapes = jax.eval_shape(lambda r: dual_encoder.init_params(model, r, (32, 32, 3), 7),
                          jax.random.key(0))
  params = dual_encoder.load_pretrained(zeros_like_shapes(shapes), config)
  proj = params["img"]["proj"]
  rng = np.random.default_rng(1)
  proj["kernel"] = rng.normal(size=proj["kernel"].shape).astype(np.float32) / np.sqrt(512)
  proj["bias"] = rng.normal(size=proj["bias"].shape).astype(np.float32) * 0.1
  return config, params


def test_resnet18_matches_numpy_reference(resnet18_file, resnet18_params):
  _, state = resnet18_file
  config, params = resnet18_params
  images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  tower = image_towers.ResNetTower(18, DIM)
  got = jax.jit(tower.apply)({"params": params["img"]}, jnp.asarray(images))

  features = np_resnet18_features(images, state)
  proj = params["img"]["proj"]
  expected = features @ proj["kernel"].astype(np.float64) + proj["bias"]
  # float32 against a float64 reference: ~20 layers of sums of up to 4608
  # products, each rounding at ~6e-8 relative; errors stay near 1e-6 of the
  # output scale. 1e-4 leaves margin, while a transposed kernel, shifted
  # padding or wrong BN leaf gives O(1) differences.
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)

  # Through the dual encoder built from the config: the same, normalised;
  # and float input in [-1, 1] is the same image as uint8 (x / 127.5 - 1).
  model = dual_encoder.build_model(config, vocab_size=30)
  as_float = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  emb = jax.jit(lambda p, x: model.apply({"params": p}, x, method=DualEncoder.embed_images))(
      params, as_float)
  np.testing.assert_allclose(
      emb, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)


def test_load_resnet_weights_layout(resnet18_file, resnet18_params, tmp_path):
  _, state = resnet18_file
  _, params = resnet18_params
  backbone = params["img"]["backbone"]
  # HWIO kernels from OIHW; BN leaves by torchvision name.
  np.testing.assert_array_equal(backbone["conv1"]["kernel"],
                                state["conv1.weight"].transpose(2, 3, 1, 0))
  ds = backbone["layer2_0"]["downsample_bn"]
  np.testing.assert_array_equal(ds["var"], state["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(ds["scale"], state["layer2.0.downsample.1.weight"])
  assert backbone["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 512, 512)

  # .safetensors holding the same state loads to the same tree.
  st_path = str(tmp_path / "resnet18.safetensors")
  save_file(state, st_path)
  again = image_towers.load_resnet_weights(st_path, 18)
  assert flat(again).keys() == flat(backbone).keys()
  for key, value in flat(again).items():
    np.testing.assert_array_equal(value, flat(backbone)[key])


def test_resnet_shapes_for_50_and_152():
  # Shapes only (eval_shape traces the init's forward pass, so the stages
  # chain; a CPU forward of these is slow).
  # torchvision's parameter counts (resnet50: 25,557,032; resnet152:
  # 60,192,808) less fc (2048 * 1000 + 1000); our tree adds two BN
  # statistics per BN channel, which torchvision keeps as buffers.
  for depth, bottlenecks, torchvision_count in ((50, 16, 25_557_032),
                                                (152, 50, 60_192_808)):
    model = dual_encoder.build_model(resnet_config(image_tower=f"resnet{depth}"), 30)
    shapes = jax.eval_shape(
        lambda r, model=model: dual_encoder.init_params(model, r, (64, 64, 3), 7),
        jax.random.key(0))
    img = shapes["img"]
    assert img["proj"]["kernel"].shape == (2048, DIM)
    blocks = [k for k in img["backbone"] if k.startswith("layer")]
    assert len(blocks) == bottlenecks  # 3+4+6+3 and 3+8+36+3
    first = img["backbone"]["layer1_0"]
    assert first["conv3"]["kernel"].shape == (1, 1, 64, 256)  # expansion 4
    assert first["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
    trained = sum(v.size for p, v in jax.tree_util.tree_flatten_with_path(img["backbone"])[0]
                  if p[-1].key not in ("mean", "var"))
    assert trained == torchvision_count - 2_049_000


def test_resnet_unknown_depth_fails():
  with pytest.raises(ValueError, match="valid"):
    dual_encoder.build_model(resnet_config(image_tower="resnet34"), 30)


def test_frozen_batchnorm_statistics_get_no_gradient():
  bn = image_towers.FrozenBatchNorm()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.1, 0.0, -0.1]),
            "mean": jnp.array([0.2, -0.3, 0.0]), "var": jnp.array([1.0, 4.0, 0.25])}
  y = bn.apply({"params": params}, x)
  expected = (x - params["mean"]) / np.sqrt(params["var"] + 1e-5) * params["scale"] + params["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(bn.apply({"params": p}, x))))(params)
  assert not np.any(grads["mean"]) and not np.any(grads["var"])
  assert np.all(grads["scale"] != 0) and np.all(grads["bias"] != 0)


@pytest.mark.parametrize("freeze", [True, False])
def test_resnet_freeze_backbone(freeze, resnet18_params):
  _, params = resnet18_params
  tower = image_towers.ResNetTower(18, DIM, freeze_backbone=freeze)
  images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), np.uint8))
  target = jnp.asarray(np.random.default_rng(4).normal(size=(2, DIM)), jnp.float32)

  def loss(p):
    return jnp.sum((tower.apply({"params": p}, images) - target) ** 2)

  img = params["img"]
  grads = jax.jit(jax.grad(loss))(img)
  assert np.any(grads["proj"]["kernel"])
  backbone_grads = flat(grads["backbone"])
  stats = [k for k in backbone_grads if k.endswith("['mean']") or k.endswith("['var']")]
  assert stats and not any(np.any(backbone_grads[k]) for k in stats)
  if freeze:
    assert not any(np.any(g) for g in backbone_grads.values())
    new = adam_step(img, grads)
    for key, value in flat(new["backbone"]).items():
      np.testing.assert_array_equal(value, flat(img["backbone"])[key], err_msg=key)
    assert np.any(np.asarray(new["proj"]["kernel"]) != img["proj"]["kernel"])
  else:
    assert np.any(backbone_grads["['conv1']['kernel']"])
    assert np.any(backbone_grads["['layer1_0']['bn2']['scale']"])


def test_bad_resnet_weights_files(resnet18_file, tmp_path):
  path, state = resnet18_file
  with pytest.raises(FileNotFoundError, match="nowhere.npz"):
    image_towers.load_resnet_weights(str(tmp_path / "nowhere.npz"), 18)

  def saved(name, mutated):
    out = str(tmp_path / name)
    np.savez(out, **mutated)
    return out

  missing = {k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"}
  bad = saved("missing.npz", missing)
  with pytest.raises(ValueError, match=r"missing\.npz.*'layer3\.1\.bn2\.running_var'"):
    image_towers.load_resnet_weights(bad, 18)

  # An HWIO kernel where torchvision's OIHW is expected.
  transposed = dict(state, **{"layer1.0.conv1.weight":
                              state["layer1.0.conv1.weight"][:, :32].transpose(2, 3, 1, 0)})
  bad = saved("transposed.npz", transposed)
  with pytest.raises(ValueError, match=r"transposed\.npz.*'layer1\.0\.conv1\.weight'.*shape"):
    image_towers.load_resnet_weights(bad, 18)

  # resnet34 has a third block in layer1: keys resnet18 does not use.
  extra = dict(state, **{"layer1.2.conv1.weight": state["layer1.0.conv1.weight"]})
  bad = saved("extra.npz", extra)
  with pytest.raises(ValueError, match=r"extra\.npz.*layer1\.2\.conv1\.weight"):
    image_towers.load_resnet_weights(bad, 18)

  # A resnet18 file for a resnet50 tower: the first missing key is named.
  with pytest.raises(ValueError, match=r"resnet18\.npz.*no key"):
    image_towers.load_resnet_weights(path, 50)

  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="garbage.npz"):
    image_towers.load_resnet_weights(str(garbage), 18)


# ------------------------------------------------------------------- MiniLM

CAPTIONS = ["A man riding a horse on the beach.",
            "Two dogs play with a frisbee in the snowboarding park",
            "a red disc"]


@pytest.fixture(scope="module")
def tokenizer():
  return text.WordPieceTokenizer.packaged()


@pytest.fixture(scope="module")
def vocab_txt():
  with open(os.path.join(text.packaged_minilm_dir(), "vocab.txt"), encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


def test_wordpiece_encode_matches_vocab_file(tokenizer, vocab_txt):
  tokens, lengths, truncated = tokenizer.encode(CAPTIONS, 20)
  assert tokens.dtype == lengths.dtype == np.int32 and tokens.shape == (3, 20)
  assert truncated == 0
  # Decoded through BERT's vocab.txt (line number = id), independently of
  # the tokenizers library.
  pieces = [[vocab_txt[i] for i in row[:n]] for row, n in zip(tokens, lengths)]
  assert pieces[0] == ["[CLS]", "a", "man", "riding", "a", "horse", "on", "the",
                       "beach", ".", "[SEP]"]
  assert pieces[2] == ["[CLS]", "a", "red", "disc", "[SEP]"]
  # Word pieces glue back to the lower-cased caption's words.
  words = " ".join(pieces[1][1:-1]).replace(" ##", "")
  assert words == CAPTIONS[1].lower()
  assert np.all(tokens[np.arange(20)[None, :] >= lengths[:, None]] == 0)  # [PAD]
  assert tokenizer.size == len(vocab_txt) == minilm.VOCAB_SIZE


def test_wordpiece_truncation(tokenizer, vocab_txt):
  full, full_lengths, _ = tokenizer.encode(CAPTIONS, 32)
  tokens, lengths, truncated = tokenizer.encode(CAPTIONS, 6)
  assert truncated == 2  # the first two captions have more than 4 pieces
  np.testing.assert_array_equal(lengths, np.minimum(full_lengths, 6))
  for row, full_row in zip(tokens[:2], full[:2]):
    np.testing.assert_array_equal(row[:5], full_row[:5])  # [CLS] + 4 pieces
    assert vocab_txt[row[5]] == "[SEP]"
  np.testing.assert_array_equal(tokens[2], full[2, :6])


def test_wordpiece_encode_errors(tokenizer):
  with pytest.raises(ValueError, match="Caption 1"):
    tokenizer.encode(["a cat", ""], 8)
  with pytest.raises(ValueError, match="Caption 0 is a int"):
    tokenizer.encode([3], 8)
  with pytest.raises(ValueError, match="max_len"):
    tokenizer.encode(["a cat"], 2)
  with pytest.raises(ValueError, match="sequence"):
    tokenizer.encode("a cat", 8)


def test_wordpiece_json_round_trip(tokenizer):
  data = json.loads(json.dumps(tokenizer.to_json()))
  again = text.tokenizer_from_json(data)
  assert isinstance(again, text.WordPieceTokenizer) and again == tokenizer
  np.testing.assert_array_equal(again.encode(CAPTIONS, 12)[0], tokenizer.encode(CAPTIONS, 12)[0])
  with pytest.raises(ValueError, match="not the one"):
    text.WordPieceTokenizer.from_json({**data, "sha256": "0" * 64})
  # A snapshot's vocabulary and a WordPiece tokenizer never pass for each other.
  vocab = text.build_vocabulary(["a red disc"])
  assert text.tokenizer_from_json(vocab.to_json()) == vocab
  assert vocab != tokenizer
  with pytest.raises(ValueError, match="tokenizer"):
    text.Vocabulary.from_json(data)
  with pytest.raises(ValueError):
    text.WordPieceTokenizer.from_json(vocab.to_json())


def np_layer_norm(x, w, b):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-12) * w + b


def np_gelu(x):
  from math import erf  # pylint: disable=g-import-not-at-top
  return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def np_minilm(tokens, lengths, state):
  """sentence-transformers all-MiniLM-L6-v2 before Normalize: BERT + masked mean, float64."""
  s = {k: v.astype(np.float64) for k, v in state.items()}
  batch, length = tokens.shape
  mask = np.arange(length)[None, :] < lengths[:, None]
  x = (s["embeddings.word_embeddings.weight"][tokens]
       + s["embeddings.position_embeddings.weight"][:length][None]
       + s["embeddings.token_type_embeddings.weight"][0])
  x = np_layer_norm(x, s["embeddings.LayerNorm.weight"], s["embeddings.LayerNorm.bias"])
  heads, head_dim = 12, 32
  for i in range(6):
    p = f"encoder.layer.{i}."
    lin = lambda v, name: v @ s[p + name + ".weight"].T + s[p + name + ".bias"]
    split = lambda v: v.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
    q = split(lin(x, "attention.self.query"))
    k = split(lin(x, "attention.self.key"))
    v = split(lin(x, "attention.self.value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = np_layer_norm(x + lin(attended, "attention.output.dense"),
                      s[p + "attention.output.LayerNorm.weight"],
                      s[p + "attention.output.LayerNorm.bias"])
    y = lin(np_gelu(lin(x, "intermediate.dense")), "output.dense")
    x = np_layer_norm(x + y, s[p + "output.LayerNorm.weight"], s[p + "output.LayerNorm.bias"])
  m = mask[:, :, None].astype(np.float64)
  return (x * m).sum(1) / m.sum(1)


def minilm_config(**overrides):
  fields = dict(image_tower="precomputed", text_tower="minilm", embed_dim=384,
                freeze_text_backbone=False)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def minilm_params():
  """A precomputed + minilm dual encoder's params with the packaged weights."""
  config = minilm_config()
  model = dual_encoder.build_model(config, vocab_size=minilm.VOCAB_SIZE)
  shapes = jax.eval_shape(lambda r: dual_encoder.init_params(model, r, (12,), 16),
                          jax.random.key(0))
  return model, dual_encoder.load_pretrained(zeros_like_shapes(shapes), config)


def test_minilm_matches_numpy_reference(tokenizer, minilm_params):
  model, params = minilm_params
  assert "proj" not in params["txt"]  # embed_dim 384: the pretrained embedding as is
  state = load_file(minilm.default_weights_path())
  np.testing.assert_array_equal(params["txt"]["encoder"]["layer_3"]["intermediate"]["kernel"],
                                state["encoder.layer.3.intermediate.dense.weight"].T)
  tokens, lengths, _ = tokenizer.encode(CAPTIONS, 16)
  expected = np_minilm(tokens, lengths, state)

  tower = minilm.MiniLMTower(embed_dim=384)
  got = jax.jit(tower.apply)({"params": params["txt"]}, tokens, lengths)
  # float32 against a float64 reference through 6 post-LN layers: LayerNorm
  # keeps activations O(1), so errors stay near 1e-6; 2e-5 leaves margin
  # while a wrong kernel orientation, mask or GELU changes values by > 1e-2.
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)

  # Through the dual encoder: the same, normalised; and more padding changes
  # nothing (attention and pooling ignore it).
  longer, longer_lengths, _ = tokenizer.encode(CAPTIONS, 24)
  emb = jax.jit(lambda p, t, l: model.apply({"params": p}, t, l,
                                            method=DualEncoder.embed_texts))(
                                                params, longer, longer_lengths)
  np.testing.assert_allclose(emb, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                             atol=2e-5)
  # all-MiniLM-L6-v2 is a sentence model: the two captions about different
  # scenes are less alike than each is to itself, and not collapsed.
  assert np.all(np.asarray(emb @ emb.T)[np.triu_indices(3, 1)] < 0.9)


def test_pretrained_tokenizer_follows_the_text_tower(tokenizer):
  assert dual_encoder.pretrained_tokenizer(minilm_config()) == tokenizer
  assert dual_encoder.pretrained_tokenizer(minilm_config(text_tower="gru")) is None


def test_minilm_projection_and_build_errors():
  model = dual_encoder.build_model(minilm_config(embed_dim=DIM), minilm.VOCAB_SIZE)
  shapes = jax.eval_shape(lambda r: dual_encoder.init_params(model, r, (12,), 16),
                          jax.random.key(0))
  assert shapes["txt"]["proj"]["kernel"].shape == (384, DIM)
  assert shapes["txt"]["encoder"]["embeddings"]["word"]["embedding"].shape == (30522, 384)
  with pytest.raises(ValueError, match="WordPiece"):
    dual_encoder.build_model(minilm_config(), vocab_size=100)
  with pytest.raises(ValueError, match="positions"):
    jax.eval_shape(lambda r: dual_encoder.init_params(model, r, (12,), 600),
                   jax.random.key(0))


@pytest.mark.parametrize("freeze", [True, False])
def test_minilm_freeze(freeze):
  # A shrunk encoder (same module, random init): the gradient structure does
  # not depend on the sizes, and it compiles in a fraction of the time.
  encoder = minilm.BertEncoder(vocab_size=40, hidden_dim=16, num_layers=1, num_heads=4,
                               mlp_dim=32, max_positions=16)
  model = DualEncoder(img=image_towers.PrecomputedProjection(embed_dim=8),
                      txt=minilm.MiniLMTower(embed_dim=8, freeze_backbone=freeze, encoder=encoder))
  # Random values in the init's tree (a jitted init costs more than the test).
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda r: dual_encoder.init_params(model, r, (12,), 6),
                          jax.random.key(0))
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), shapes)
  images = jnp.asarray(rng.normal(size=(3, 12)), jnp.float32)
  tokens = jnp.asarray(rng.integers(1, 40, (3, 6)), jnp.int32)
  lengths = jnp.array([6, 3, 4], jnp.int32)

  def loss(p):
    img, txt = model.apply({"params": p}, images, tokens, lengths)
    return -jnp.sum(jnp.diag(img @ txt.T))

  grads = jax.jit(jax.grad(loss))(params)
  encoder_grads = flat(grads["txt"]["encoder"])
  assert np.any(grads["txt"]["proj"]["kernel"])
  if freeze:
    assert not any(np.any(g) for g in encoder_grads.values())
    new = adam_step(params, grads)
    for key, value in flat(new["txt"]["encoder"]).items():
      np.testing.assert_array_equal(value, flat(params["txt"]["encoder"])[key], err_msg=key)
    assert np.any(np.asarray(new["txt"]["proj"]["kernel"]) != params["txt"]["proj"]["kernel"])
  else:
    assert np.any(encoder_grads["['layer_0']['attention']['query']['kernel']"])
    assert np.any(encoder_grads["['embeddings']['word']['embedding']"])


def test_load_pretrained_leaves_other_towers_alone(resnet18_params):
  # No pretrained tower named: nothing read, the same arrays back.
  params = {"img": {"w": np.ones(2)}, "txt": {"v": np.zeros(3)}, "loss": {"t": 1.0}}
  config = ml_collections.ConfigDict(dict(image_tower="cnn", text_tower="gru", embed_dim=4))
  out = dual_encoder.load_pretrained(params, config)
  assert out["img"] is params["img"] and out["txt"] is params["txt"]
  assert out["loss"] is params["loss"]
  # A ResNet without a weights file keeps its random init.
  config = resnet_config()
  _, loaded = resnet18_params
  out = dual_encoder.load_pretrained(loaded, config)
  assert out["img"] is loaded["img"]
