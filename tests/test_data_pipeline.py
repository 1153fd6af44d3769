"""The grain pipeline: determinism, per-process shards, corrupt-image skipping, exact resume."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from dediffusion_jax.data.pipeline import make_dataset
from dediffusion_jax.data.preprocess import PreprocessConfig, Preprocessor, split_captions
from dediffusion_jax.data.sources import ImageFolderSource, TfdsSource
from helpers.testing_builders import NUM_EXAMPLES, build_tiny_captioned_images

SMALL = Preprocessor(PreprocessConfig(backbone_size=8, decoder_size=6))
NUM_GOOD = 14


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root, num_good: int = NUM_GOOD, corrupt: bool = False):
    rng = np.random.default_rng(0)
    for i in range(num_good):
        arr = rng.integers(0, 256, size=(9 + i % 4, 12, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"good_{i:02d}.png")
    if corrupt:
        jpeg = encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
        (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
        (root / "random_bytes.png").write_bytes(np.random.default_rng(1).bytes(300))
        (root / "empty.webp").write_bytes(b"")
    return ImageFolderSource(root)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("clean"))


def ids_of(ds, num_batches: int) -> list[str]:
    it = iter(ds)
    return [str(i) for _ in range(num_batches) for i in next(it)["id"]]


def test_same_seed_same_order_different_seed_different(clean):
    kw = dict(global_batch_size=7, process_index=0, process_count=1, preprocess_fn=SMALL)
    a = ids_of(make_dataset(clean, seed=1, **kw), 4)  # two epochs
    assert a == ids_of(make_dataset(clean, seed=1, **kw), 4)
    assert a != ids_of(make_dataset(clean, seed=2, **kw), 4)
    epoch0, epoch1 = a[:NUM_GOOD], a[NUM_GOOD:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(clean[i]["id"] for i in range(NUM_GOOD))
    assert epoch0 != epoch1  # reshuffled every epoch
    in_order = ids_of(make_dataset(clean, seed=1, shuffle=False, **kw), 2)
    assert in_order == [clean[i]["id"] for i in range(NUM_GOOD)]


def test_process_shards_are_disjoint_and_cover_the_data(clean):
    shards = []
    for p in range(2):
        ds = make_dataset(clean, global_batch_size=2, seed=0, num_epochs=1, process_index=p,
                          process_count=2, preprocess_fn=SMALL)
        assert ds.batch_size == 1
        shards.append([str(i) for batch in ds for i in batch["id"]])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(clean[i]["id"] for i in range(NUM_GOOD))
    single = make_dataset(clean, global_batch_size=2, seed=0, preprocess_fn=SMALL)
    assert single.batch_size == 2  # defaults: jax.process_index() / jax.process_count() = 0 / 1
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_dataset(clean, global_batch_size=3, seed=0, process_index=0, process_count=2)


def test_corrupt_files_are_skipped_counted_and_batches_stay_full(tmp_path, caplog):
    source = make_folder(tmp_path, corrupt=True)
    assert len(source) == NUM_GOOD + 3
    ds = make_dataset(source, global_batch_size=4, seed=0, num_epochs=1, process_index=0,
                      process_count=1, preprocess_fn=SMALL, drop_remainder=False)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="dediffusion_jax.data.pipeline"):
        batches = list(it)
    sizes = [len(b["id"]) for b in batches]
    assert sizes == [4, 4, 4, 2]  # 14 good images; the 3 corrupt ones never reach a batch
    assert it.num_skipped == 3
    assert all(b["backbone"].shape[1:] == (8, 8, 3) and b["decoder"].shape[1:] == (6, 6, 3)
               for b in batches)
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in ("truncated.jpg", "random_bytes.png", "empty.webp"):
        assert name in logged

    # Training mode (forever, drop_remainder): every batch is full, skips keep being counted.
    it = iter(make_dataset(source, global_batch_size=4, seed=0, process_index=0,
                           process_count=1, preprocess_fn=SMALL))
    for _ in range(14):  # 56 good examples = 4 epochs
        assert next(it)["decoder"].shape == (4, 6, 6, 3)
    assert it.num_skipped in (12, 15)  # the 5th epoch's corrupt files may already be passed


def test_all_corrupt_source_fails_loudly(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"junk")
    it = iter(make_dataset(ImageFolderSource(tmp_path), global_batch_size=1, seed=0,
                           process_index=0, process_count=1, preprocess_fn=SMALL,
                           max_consecutive_failures=20))
    with pytest.raises(RuntimeError, match="consecutive examples failed"):
        next(it)


def test_iterator_state_restores_to_the_exact_next_batch(tmp_path):
    source = make_folder(tmp_path, corrupt=True)
    augmenting = Preprocessor(PreprocessConfig(backbone_size=8, decoder_size=6, augment=True))
    ds = make_dataset(source, global_batch_size=3, seed=7, process_index=0, process_count=1,
                      preprocess_fn=augmenting)
    it = iter(ds)
    for _ in range(6):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(5)]

    resumed = iter(ds)
    resumed.set_state(state)
    assert resumed.num_skipped == state["num_skipped"] > 0
    for want in expected:
        got = next(resumed)
        assert list(got["id"]) == list(want["id"])
        np.testing.assert_array_equal(got["backbone"], want["backbone"])  # same augmentation
        np.testing.assert_array_equal(got["decoder"], want["decoder"])
    assert resumed.num_skipped == it.num_skipped


def test_worker_processes_same_batches_skip_count_and_resume(tmp_path):
    source = make_folder(tmp_path, corrupt=True)
    kw = dict(global_batch_size=4, seed=3, process_index=0, process_count=1, preprocess_fn=SMALL)
    in_process = iter(make_dataset(source, **kw))
    want = [list(next(in_process)["id"]) for _ in range(6)]
    ds = make_dataset(source, worker_count=1, **kw)
    it, resumed = iter(ds), iter(ds)
    try:
        assert [list(next(it)["id"]) for _ in range(3)] == want[:3]
        state = json.loads(json.dumps(it.get_state()))
        assert [list(next(it)["id"]) for _ in range(3)] == want[3:]
        assert it.num_skipped == in_process.num_skipped  # counted inside the worker, summed here
        resumed.set_state(state)
        assert [list(next(resumed)["id"]) for _ in range(3)] == want[3:]
    finally:
        it.close()
        resumed.close()


def test_tfds_dataset_with_captions_through_the_pipeline(tmp_path):
    build_tiny_captioned_images(tmp_path)
    source = TfdsSource("tiny_captioned_images", "train", tmp_path)
    ds = make_dataset(source, global_batch_size=4, seed=0, num_epochs=1, process_index=0,
                      process_count=1, preprocess_fn=SMALL)
    batches = list(ds)
    assert len(batches) == NUM_EXAMPLES["train"] // 4
    for batch in batches:
        assert batch["backbone"].shape == (4, 8, 8, 3) and batch["label"].dtype == np.int32
        for rid, caps in zip(batch["id"], batch["captions"]):
            idx = int(str(rid).rsplit("=", 1)[1])
            assert split_captions(caps)[0] == f"picture {idx} caption 0"


def test_grain_orbax_checkpoint_handler_saves_and_restores_the_iterator(clean, tmp_path):
    import grain
    from etils import epath

    ds = make_dataset(clean, global_batch_size=4, seed=5, process_index=0, process_count=1,
                      preprocess_fn=SMALL)
    it = iter(ds)
    next(it)
    handler = grain.checkpoint.CheckpointHandler()  # what orbax uses for grain iterators
    handler.save(epath.Path(tmp_path), item=it)
    want = list(next(it)["id"])
    restored = handler.restore(epath.Path(tmp_path), item=iter(ds))
    assert list(next(restored)["id"]) == want
