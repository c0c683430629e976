"""Tests for ccr_jax.indexing: exact search, ScaNN recall, save/load safety."""

import hashlib
import json
import math
import os

import jax
import numpy as np
import pytest

from ccr_jax import files
from ccr_jax import indexing
from ccr_jax.indexing import IndexMismatchError
from ccr_jax.indexing import exact
from ccr_jax.indexing import scann_backend


def _normalise(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(count, dim, *, seed, num_clusters=200, spread=0.5, shift=0.0):
  """Embedding-like data: Gaussian clusters around fixed random unit centers.

  `shift` adds a common offset, as the other modality's queries carry (the
  modality gap): the tree is trained on the gallery only.
  """
  centers_rng = np.random.default_rng(1234)  # same centers for every call
  centers = _normalise(centers_rng.normal(size=(num_clusters, dim)))
  offset = _normalise(centers_rng.normal(size=(1, dim)))[0]
  rng = np.random.default_rng(seed)
  points = (centers[rng.integers(0, num_clusters, count)]
            + spread * rng.normal(size=(count, dim)) / np.sqrt(dim)
            + shift * offset)
  return _normalise(points)


def _build(embeddings, item_ids=None, **kwargs):
  kwargs.setdefault("snapshot", 2)
  kwargs.setdefault("task", 1)
  kwargs.setdefault("modality", "texts")
  if item_ids is None:
    item_ids = 1000 + np.arange(embeddings.shape[0])
  return indexing.build_index(embeddings, item_ids, **kwargs)


@pytest.fixture(scope="module")
def tree_index():
  """20k x 64 clustered gallery: above BRUTE_FORCE_MAX_COUNT, so tree + AH."""
  gallery = _clustered(20_000, 64, seed=0)
  return _build(gallery, item_ids=np.arange(20_000) * 3 + 7)


@pytest.fixture(scope="module")
def small_gallery():
  return _clustered(500, 32, seed=5), np.arange(500) + 10**6


def _assert_same_top_k(scores, ids, expected_scores, expected_ids):
  # Scores agree to float32 rounding of a 64-term dot product (~1e-6);
  # ids agree exactly because the test data has no near-ties at that scale.
  np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(ids, expected_ids)


# ----------------------------------------------------------------------------
# Exact search and merging.


@pytest.mark.parametrize("num_queries,block_size", [(37, 16), (5, 1024)])
def test_exact_search_equals_numpy_argsort(num_queries, block_size):
  rng = np.random.default_rng(0)
  queries = _normalise(rng.normal(size=(num_queries, 24)))
  gallery = _normalise(rng.normal(size=(300, 24)))
  scores, rows = indexing.exact_search(queries, gallery, 10,
                                       block_size=block_size)
  reference = queries.astype(np.float64) @ gallery.astype(np.float64).T
  order = np.argsort(-reference, axis=1, kind="stable")[:, :10]
  assert scores.shape == rows.shape == (num_queries, 10)
  assert scores.dtype == np.float32 and rows.dtype == np.int64
  _assert_same_top_k(scores, rows,
                     np.take_along_axis(reference, order, axis=1), order)


def test_exact_search_clamps_k_and_breaks_ties_by_index():
  gallery = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
  scores, rows = indexing.exact_search(np.array([[1, 0]], np.float32),
                                       gallery, 10)
  np.testing.assert_array_equal(rows, [[0, 2, 1]])  # k clamped to 3
  np.testing.assert_array_equal(scores, [[1, 1, 0]])


def test_exact_index_search_returns_item_ids(small_gallery):
  gallery, ids = small_gallery
  index = _build(gallery, ids, backend="exact")
  scores, found = indexing.search(index, gallery[:20], 5)
  np.testing.assert_array_equal(found[:, 0], ids[:20])  # each finds itself
  np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 10, 300, 400])  # 400 > 300 items: clamped
def test_exact_index_equals_stable_argsort_with_ties(k):
  # Entries in {-1, 0, 1, 2} over 8 dims: every dot product is a small integer,
  # exact in float32 in any summation order, so scores must match bit for bit
  # and the many equal scores test the tie order: the lower gallery row first,
  # as a stable argsort of -scores orders them.
  rng = np.random.default_rng(7)
  gallery = rng.integers(-1, 3, size=(300, 8)).astype(np.float32)
  queries = rng.integers(-1, 3, size=(37, 8)).astype(np.float32)
  item_ids = rng.permutation(300) + 5000  # ids out of row order
  reference = queries.astype(np.float64) @ gallery.astype(np.float64).T
  order = np.argsort(-reference, axis=1, kind="stable")[:, :min(k, 300)]
  expected_scores = np.take_along_axis(reference, order, axis=1).astype(np.float32)
  top_10 = -np.sort(-reference, axis=1)[:, :10]
  assert (np.diff(top_10, axis=1) == 0).mean() > 0.3  # ties abound
  index = _build(gallery, item_ids, backend="exact")
  for block_size in (16, 1024):  # three padded blocks; one block
    scores, ids = indexing.search(index, queries, k, block_size=block_size)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(ids, item_ids[order])
    # The free function on a host gallery (copied per call) agrees.
    scores, rows = indexing.exact_search(queries, gallery, k,
                                         block_size=block_size)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(rows, order)


def test_exact_index_keeps_its_gallery_on_device(small_gallery, tmp_path):
  gallery, ids = small_gallery
  index = _build(gallery, ids, backend="exact")
  # Placed once at build: a search only runs the compiled matmul + top-k.
  assert isinstance(index.state, jax.Array)
  np.testing.assert_array_equal(np.asarray(index.state), gallery)
  assert exact.device_gallery(index.state) is index.state  # no copy
  expected = indexing.search(index, gallery[:20], 5)
  compiled = exact._top_k_block._cache_size()
  # 17 and 20 queries share one 32-row block: nothing compiles again.
  indexing.search(index, gallery[:17], 5)
  indexing.search(index, gallery[20:40], 5)
  assert exact._top_k_block._cache_size() == compiled
  indexing.save_index(index, tmp_path / "exact")
  loaded = indexing.load_index(tmp_path / "exact")
  assert isinstance(loaded.state, jax.Array)
  for x, y in zip(indexing.search(loaded, gallery[:20], 5), expected):
    np.testing.assert_array_equal(x, y)
  # An exact Index assembled without its state still searches (per-call copy).
  bare = indexing.Index(index.metadata, index.embeddings, index.item_ids)
  for x, y in zip(indexing.search(bare, gallery[:20], 5), expected):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_search_many_equals_search_over_concatenation(backend):
  rng = np.random.default_rng(3)
  parts = [_normalise(rng.normal(size=(n, 16))) for n in (50, 7, 120)]
  part_ids = [np.arange(n) + 1000 * i for i, n in enumerate((50, 7, 120))]
  queries = _normalise(rng.normal(size=(30, 16)))
  indices = [_build(p, i, backend=backend, task=t)
             for t, (p, i) in enumerate(zip(parts, part_ids))]
  union = _build(np.concatenate(parts), np.concatenate(part_ids),
                 backend="exact")
  for k in (1, 10, 500):  # 500 > 177 items: clamped
    scores, ids = indexing.search_many(indices, queries, k)
    expected_scores, expected_ids = indexing.search(union, queries, k)
    assert ids.shape == (30, min(k, 177))
    _assert_same_top_k(scores, ids, expected_scores, expected_ids)


# ----------------------------------------------------------------------------
# ScaNN.


@pytest.mark.parametrize("count,leaves,searched,sample,dims_per_block", [
    (10_000, 100, 20, 10_000, 2),  # sqrt(10k); 2 * sqrt(100); whole gallery
    (20_000, 141, 24, 20_000, 2),  # round(141.4); ceil(23.7)
    (100_000, 316, 24, 50_000, 2),  # round(316.2); capped at 24; sample floor
    (1_000_000, 1000, 24, 50_000, 4),  # 2% = 20 < 24; 50 * 1000 = 50k; 4-d AH
    (4_000_000, 2000, 40, 100_000, 4),  # 2% of 2000; 50 per leaf
])
def test_scann_parameter_rule_for_trees(count, leaves, searched, sample,
                                        dims_per_block):
  params = indexing.scann_parameters(count)
  assert params == {
      "mode": "tree_ah", "num_neighbors": 10, "num_leaves": leaves,
      "num_leaves_to_search": searched, "training_sample_size": sample,
      "dims_per_block": dims_per_block,
      "anisotropic_quantization_threshold": None, "reorder_num_neighbors": 100}


def test_scann_parameter_rule_small_galleries_and_overrides():
  # The embedded benchmark's galleries (480-2400 items) are brute force.
  for count in (0, 480, 2400, indexing.BRUTE_FORCE_MAX_COUNT - 1):
    assert indexing.scann_parameters(count) == {"mode": "brute_force",
                                                "num_neighbors": 10}
  params = indexing.scann_parameters(
      1_000_000, {"leaves_to_search_fraction": 0.025, "num_leaves": 1000,
                  "anisotropic_quantization_threshold": 0.2})
  assert params["num_leaves"] == 1000
  assert params["num_leaves_to_search"] == 25  # of the overridden 1000
  assert params["anisotropic_quantization_threshold"] == 0.2
  assert params["training_sample_size"] == 50_000
  forced = indexing.scann_parameters(2400, {"mode": "tree_ah"})
  assert (forced["num_leaves"], forced["num_leaves_to_search"]) == (49, 14)
  assert forced["training_sample_size"] == 2400  # never more than the gallery


@pytest.mark.parametrize("count,leaves,searched,dims_per_block", [
    (10_000, 100, 20, 2),  # 2 * sqrt(100)
    (20_000, 141, 24, 2),  # ceil(23.7)
    (100_000, 316, 24, 2),  # capped: 2 * sqrt(316) = 35.6 > 24
    (999_999, 1000, 24, 2),  # 2% of 1000 = 20 < 24
    (1_000_000, 1000, 24, 4),  # AH with 4 dims a block from 1M items
    (4_000_000, 2000, 40, 4),  # 2% of 2000
])
def test_scann_rule_caps_leaves_searched_of_large_trees(count, leaves, searched,
                                                        dims_per_block):
  params = indexing.scann_parameters(count)
  assert (params["num_leaves"], params["num_leaves_to_search"],
          params["dims_per_block"]) == (leaves, searched, dims_per_block)
  # The rule before the cap stays one option set away.
  old = indexing.scann_parameters(
      count, {"num_leaves_to_search": math.ceil(2 * math.sqrt(leaves)),
              "dims_per_block": 2})
  assert old == {**params, "num_leaves_to_search": math.ceil(2 * math.sqrt(leaves)),
                 "dims_per_block": 2}


def test_scann_warns_of_coarse_ah_on_low_dimensional_data(small_gallery, caplog):
  gallery, ids = small_gallery  # 32-d
  options = {"mode": "tree_ah", "num_leaves": 10}
  with caplog.at_level("WARNING"):
    _build(gallery, ids, options=options)
  assert "dims_per_block" not in caplog.text
  with caplog.at_level("WARNING"):
    index = _build(gallery, ids, options={**options, "dims_per_block": 4})
  assert index.metadata.backend_params["dims_per_block"] == 4
  assert "32-d" in caplog.text and "'dims_per_block': 2" in caplog.text


def test_scann_tree_recall_on_clustered_data(tree_index):
  params = tree_index.metadata.backend_params
  assert tree_index.metadata.backend == "scann"
  assert params == indexing.scann_parameters(20_000)
  # Approximate search: the bar is 0.95 of exact recall@10. k-means starts
  # from random centres, so recall varies between builds: over 8 builds it
  # was 0.9997-0.9999 for same-distribution queries and ~0.997 with a
  # modality-gap shift.
  same = _clustered(1000, 64, seed=1)
  assert indexing.recall_against_exact(tree_index, same, k=10) >= 0.95
  shifted = _clustered(1000, 64, seed=2, spread=0.8, shift=1.0)
  assert indexing.recall_against_exact(tree_index, shifted, k=10) >= 0.95


def test_scann_tree_large_k_is_complete_and_sorted(tree_index):
  queries = _clustered(20, 64, seed=3)
  scores, ids = indexing.search(tree_index, queries, 3000)
  assert ids.shape == (20, 3000)
  assert (ids >= 0).all() and np.isfinite(scores).all()
  assert (np.diff(scores, axis=1) <= 0).all()


def test_scann_brute_force_equals_exact(small_gallery):
  gallery, ids = small_gallery
  index = _build(gallery, ids)
  assert index.metadata.backend == "scann"
  assert index.metadata.backend_params["mode"] == "brute_force"
  queries = _clustered(100, 32, seed=6)
  exact = _build(gallery, ids, backend="exact")
  _assert_same_top_k(*indexing.search(index, queries, 10),
                     *indexing.search(exact, queries, 10))
  assert indexing.recall_against_exact(index, queries, k=10) == 1.0


def test_scann_unbuildable_falls_back_to_exact(small_gallery):
  gallery, ids = small_gallery
  # More leaves than points: ScaNN refuses to build.
  index = _build(gallery, ids,
                 options={"mode": "tree_ah", "num_leaves": 10_000})
  assert index.metadata.backend == "exact"
  assert "clusters" in index.metadata.backend_params["fallback_reason"]
  empty = _build(np.zeros((0, 32), np.float32), np.zeros((0,), np.int64))
  assert empty.metadata.backend == "exact"
  scores, found = indexing.search(empty, gallery[:3], 10)
  assert scores.shape == found.shape == (3, 0)


def test_scann_anisotropic_threshold_option_builds(small_gallery):
  gallery, ids = small_gallery
  # Every leaf searched, so recall measures the AH scores and the reorder
  # alone, not where random k-means centres happened to cut.
  index = _build(gallery, ids, options={
      "mode": "tree_ah", "num_leaves": 10, "leaves_to_search_fraction": 1.0,
      "anisotropic_quantization_threshold": 0.2})
  assert index.metadata.backend == "scann"
  assert index.metadata.backend_params["anisotropic_quantization_threshold"] == 0.2
  assert indexing.recall_against_exact(index, gallery[:50], k=10) >= 0.99


def test_scann_options_are_validated():
  with pytest.raises(ValueError, match="unknown scann_options"):
    indexing.scann_parameters(100, {"leaves": 3})
  with pytest.raises(ValueError, match="tree_ah"):
    indexing.scann_parameters(100, {"num_leaves": 3})


def test_backends_are_registered_by_name():
  assert indexing.names() == ("scann", "exact")
  for name in indexing.names():
    assert indexing.get_backend(name).name == name
  with pytest.raises(ValueError, match="scann.*exact"):
    indexing.get_backend("faiss")
  with pytest.raises(ValueError, match="scann.*exact"):
    _build(np.eye(3, dtype=np.float32), backend="faiss")


def test_exact_backend_takes_no_options(small_gallery):
  gallery, ids = small_gallery
  with pytest.raises(ValueError, match="no options"):
    _build(gallery, ids, backend="exact", options={"mode": "tree_ah"})
  index = _build(gallery, ids, backend="exact")
  assert index.metadata.backend_params == {}


def test_package_reexports_its_public_api():
  # __init__ only re-exports; `search` is the function, not the module
  # (which is named `searching` for that reason).
  for name in indexing.__all__:
    assert getattr(indexing, name) is not None, name
  assert indexing.search is indexing.searching.search
  assert indexing.save_index is indexing.storage.save_index


def test_config_keys_match_the_default_config():
  keys = indexing.config_keys()
  # configs/default.py's index section, written out.
  assert {name: key.default for name, key in keys.items()} == {
      "backend": "scann", "reindex": True}
  assert keys["backend"].check("exact") is None
  assert "scann" in keys["backend"].check("faiss")


def test_metadata_json_round_trip(tree_index):
  metadata = tree_index.metadata
  assert indexing.IndexMetadata.from_json(metadata.to_json()) == metadata
  with pytest.raises(ValueError, match="missing"):
    indexing.IndexMetadata.from_json('{"snapshot": 1}')


# ----------------------------------------------------------------------------
# Saving and loading.


def _same_search(a, b, queries, k=10):
  for x, y in zip(indexing.search(a, queries, k), indexing.search(b, queries, k)):
    np.testing.assert_array_equal(x, y)


def test_save_load_round_trip_and_move(tree_index, small_gallery, tmp_path):
  gallery, ids = small_gallery
  queries = _clustered(50, 64, seed=4)
  brute = _build(gallery, ids, modality="images")
  exact = _build(gallery, ids, backend="exact", modality="images")
  workdir = tmp_path / "workdir"
  paths = {name: workdir / "indices" / name for name in ("tree", "bf", "exact")}
  for name, index in (("tree", tree_index), ("bf", brute), ("exact", exact)):
    indexing.save_index(index, paths[name])
  # The ScaNN assets must not point at the directory they were written in.
  assets = (paths["tree"] / "scann" / "scann_assets.pbtxt").read_text()
  assert str(tmp_path) not in assets and ".tmp-" not in assets

  moved = tmp_path / "moved"
  os.rename(workdir, moved)
  loaded = indexing.load_index(moved / "indices" / "tree", expect_snapshot=2,
                               expect_task=1, expect_modality="texts",
                               expect_dim=64,
                               expect_item_ids=tree_index.item_ids)
  assert loaded.metadata == tree_index.metadata
  _same_search(loaded, tree_index, queries)
  for name, index in (("bf", brute), ("exact", exact)):
    loaded = indexing.load_index(moved / "indices" / name)
    assert loaded.metadata == index.metadata
    _same_search(loaded, index, gallery[:30])
  assert sorted(os.listdir(moved / "indices")) == ["bf", "exact", "tree"]


def _dir_bytes(path):
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("mode", ["tree_ah", "brute_force"])
def test_saved_scann_index_stores_embeddings_once(mode, tree_index,
                                                  small_gallery, tmp_path):
  if mode == "tree_ah":
    index = tree_index
  else:
    index = _build(*small_gallery)
  assert index.metadata.backend_params["mode"] == mode
  exact = _build(index.embeddings, index.item_ids, backend="exact")
  indexing.save_index(index, tmp_path / "scann")
  indexing.save_index(exact, tmp_path / "exact")
  scann_dir = tmp_path / "scann" / "scann"
  assert not (scann_dir / "dataset.npy").exists()
  assert '"../embeddings.npy"' in (scann_dir / "scann_assets.pbtxt").read_text()
  # ScaNN adds its partitioner, tokens and 4-bit codes (tree: 16 bytes per
  # 64-d point against 256 of float32), about 10% of the exact index; its own
  # float copy used to double it.
  assert _dir_bytes(tmp_path / "scann") < 1.25 * _dir_bytes(tmp_path / "exact")
  loaded = indexing.load_index(tmp_path / "scann")
  _same_search(loaded, index, index.embeddings[:20])


def test_share_embeddings_keeps_a_dataset_that_differs(small_gallery, tmp_path):
  gallery, ids = small_gallery
  index = _build(gallery, ids)
  index.state.serialize(str(tmp_path), relative_path=True)
  assets = (tmp_path / "scann_assets.pbtxt").read_text()
  scann_backend.share_embeddings(str(tmp_path), gallery[::-1].copy())
  assert (tmp_path / "dataset.npy").exists()
  assert (tmp_path / "scann_assets.pbtxt").read_text() == assets


@pytest.fixture
def saved_small(small_gallery, tmp_path):
  gallery, ids = small_gallery
  directory = tmp_path / "idx"
  index = _build(gallery, ids, modality="images")
  indexing.save_index(index, directory)
  return index, directory


def _rewrite_metadata(directory, change, manifest_version=None):
  """Applies `change` (dict -> None) to metadata.json and refreshes its manifest entry.

  The entry is recomputed with hashlib, independently of the code under test.
  """
  metadata = json.loads((directory / "metadata.json").read_text())
  change(metadata)
  text = json.dumps(metadata, indent=2, sort_keys=True)
  (directory / "metadata.json").write_text(text)
  manifest = json.loads((directory / "manifest.json").read_text())
  if manifest_version is not None:
    manifest["format_version"] = manifest_version
  manifest["files"]["metadata.json"] = {
      "bytes": len(text.encode()),
      "sha256": hashlib.sha256(text.encode()).hexdigest()}
  (directory / "manifest.json").write_text(json.dumps(manifest, indent=2,
                                                      sort_keys=True))
  return metadata


def _as_version_1(metadata):
  """What the code before pluggable backends wrote: `scann_params`, version 1."""
  metadata["scann_params"] = metadata.pop("backend_params")
  metadata["format_version"] = 1


def test_loads_version_1_exact_index_written_literally(tmp_path):
  # Every file as the version-1 writer laid it out, written here by hand.
  directory = tmp_path / "v1_exact"
  directory.mkdir()
  embeddings = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
  np.save(directory / "embeddings.npy", embeddings, allow_pickle=False)
  np.save(directory / "item_ids.npy", np.array([5, 6, 7], np.int64),
          allow_pickle=False)
  (directory / "metadata.json").write_text(json.dumps({
      "backend": "exact", "count": 3, "dim": 2, "format_version": 1,
      "modality": "images", "scann_params": {"fallback_reason": "empty"},
      "snapshot": 4, "task": 2}, indent=2, sort_keys=True))
  manifest = {name: {"bytes": (directory / name).stat().st_size,
                     "sha256": hashlib.sha256(
                         (directory / name).read_bytes()).hexdigest()}
              for name in ("embeddings.npy", "item_ids.npy", "metadata.json")}
  (directory / "manifest.json").write_text(json.dumps(
      {"format_version": 1, "files": manifest}, indent=2, sort_keys=True))

  index = indexing.load_index(directory, expect_snapshot=4, expect_task=2,
                              expect_modality="images", expect_dim=2)
  assert index.metadata == indexing.IndexMetadata(
      snapshot=4, task=2, modality="images", dim=2, count=3, backend="exact",
      backend_params={"fallback_reason": "empty"},
      format_version=indexing.FORMAT_VERSION)
  # Query (0.8, 0.6): scores 0.8, 0.6, 0.96 -> items 7, 5, 6.
  scores, ids = indexing.search(index, np.array([[0.8, 0.6]], np.float32), 3)
  np.testing.assert_array_equal(ids, [[7, 5, 6]])
  np.testing.assert_allclose(scores, [[0.96, 0.8, 0.6]], atol=1e-6)


def test_loads_version_1_scann_index_and_saves_it_as_current(saved_small,
                                                             tmp_path):
  index, directory = saved_small
  old = _rewrite_metadata(directory, _as_version_1, manifest_version=1)
  loaded = indexing.load_index(directory, expect_snapshot=2,
                               expect_item_ids=index.item_ids)
  assert loaded.metadata.backend == "scann"
  assert loaded.metadata.backend_params == old["scann_params"] == (
      index.metadata.backend_params)
  assert loaded.metadata == index.metadata
  _same_search(loaded, index, index.embeddings[:20])
  indexing.save_index(loaded, tmp_path / "resaved")
  written = json.loads((tmp_path / "resaved" / "metadata.json").read_text())
  assert written["format_version"] == indexing.FORMAT_VERSION == 2
  assert "backend_params" in written and "scann_params" not in written


def test_load_rejects_an_unknown_format_version(saved_small):
  _, directory = saved_small
  _rewrite_metadata(directory, lambda m: m.update(format_version=99))
  with pytest.raises(IndexMismatchError) as error:
    indexing.load_index(directory)
  assert error.value.field == "format_version"
  assert error.value.found == 99


@pytest.mark.parametrize("field,kwargs", [
    ("snapshot", {"expect_snapshot": 3}),
    ("task", {"expect_task": 0}),
    ("modality", {"expect_modality": "texts"}),
    ("dim", {"expect_dim": 64}),
    ("item_ids", {"expect_item_ids": np.arange(500)}),
    ("item_ids", {"expect_item_ids": np.arange(499) + 10**6}),
])
def test_load_mismatch_names_the_field(saved_small, field, kwargs):
  _, directory = saved_small
  with pytest.raises(IndexMismatchError) as error:
    indexing.load_index(directory, **kwargs)
  assert error.value.field == field
  message = str(error.value)
  assert str(directory) in message and f"'{field}'" in message
  assert "expected" in message and "found" in message and "Fix:" in message


def test_load_missing_directory(tmp_path):
  with pytest.raises(IndexMismatchError, match="nothing there"):
    indexing.load_index(tmp_path / "absent")


def test_load_rejects_truncated_and_corrupt_files(saved_small):
  _, directory = saved_small
  embeddings = directory / "embeddings.npy"
  data = embeddings.read_bytes()

  embeddings.write_bytes(data[:len(data) // 2])
  with pytest.raises(IndexMismatchError, match="truncated") as error:
    indexing.load_index(directory)
  assert error.value.field == "embeddings.npy"

  flipped = bytearray(data)
  flipped[-1] ^= 0xFF
  embeddings.write_bytes(bytes(flipped))
  with pytest.raises(IndexMismatchError, match="corrupt"):
    indexing.load_index(directory)

  # Without checksums, a damaged header is still caught by the .npy reader.
  broken_header = b"garbage!" + data[8:]
  embeddings.write_bytes(broken_header)
  with pytest.raises(IndexMismatchError, match="unreadable"):
    indexing.load_index(directory, verify_checksums=False)

  embeddings.write_bytes(data)
  indexing.load_index(directory)  # intact again


def test_load_rejects_metadata_inconsistent_with_embeddings(saved_small):
  _, directory = saved_small
  metadata = json.loads((directory / "metadata.json").read_text())
  metadata["count"] = 400  # same byte length, so only the shape check sees it
  (directory / "metadata.json").write_text(json.dumps(metadata, indent=2,
                                                      sort_keys=True))
  with pytest.raises(IndexMismatchError) as error:
    indexing.load_index(directory, verify_checksums=False)
  assert error.value.field == "embeddings"
  with pytest.raises(IndexMismatchError, match="corrupt"):
    indexing.load_index(directory)


def test_load_rejects_incomplete_directory(saved_small):
  _, directory = saved_small
  os.remove(directory / "manifest.json")
  with pytest.raises(IndexMismatchError, match="not a complete") as error:
    indexing.load_index(directory)
  assert error.value.field == "manifest.json"


def test_interrupted_save_never_leaves_half_an_index(saved_small, small_gallery,
                                                     monkeypatch):
  old_index, directory = saved_small
  gallery, ids = small_gallery
  queries = gallery[:10]
  # A save killed earlier left a temporary sibling behind.
  stale = directory.parent / f".{directory.name}.tmp-deadbeef"
  stale.mkdir()
  (stale / "embeddings.npy").write_bytes(b"partial")

  # A save that fails after writing its files but before the swap.
  new_index = _build(gallery[::-1].copy(), ids[::-1].copy(), snapshot=9,
                     modality="images")

  def failing_hash(path):
    raise OSError("disk gone")

  monkeypatch.setattr(files, "sha256", failing_hash)
  with pytest.raises(OSError, match="disk gone"):
    indexing.save_index(new_index, directory)
  monkeypatch.undo()
  # The old index is untouched and no temporary directory survives.
  loaded = indexing.load_index(directory, expect_snapshot=2)
  _same_search(loaded, old_index, queries)
  assert sorted(os.listdir(directory.parent)) == [directory.name]

  # First-time save interrupted: nothing at all appears at the final path.
  fresh = directory.parent / "fresh"
  monkeypatch.setattr(files, "sha256", failing_hash)
  with pytest.raises(OSError):
    indexing.save_index(new_index, fresh)
  monkeypatch.undo()
  assert not fresh.exists()
  with pytest.raises(IndexMismatchError):
    indexing.load_index(fresh)

  # A successful save replaces the old index completely.
  indexing.save_index(new_index, directory)
  loaded = indexing.load_index(directory, expect_snapshot=9)
  _same_search(loaded, new_index, queries)
  assert sorted(os.listdir(directory.parent)) == [directory.name]
