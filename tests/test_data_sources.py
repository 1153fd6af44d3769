"""Random-access sources: image folders, array_record files, prepared tfds datasets, spec strings."""

import io

import numpy as np
import pytest
from PIL import Image

from dediffusion_jax.data.sources import (ArrayRecordSource, ImageFolderSource, TfdsSource,
                                          source_from_spec, write_array_record)
from helpers.testing_builders import NUM_EXAMPLES, build_tiny_captioned_images


def png(value: int, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build_tiny_captioned_images(data_dir)
    return data_dir


def test_image_folder_is_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/2.PNG", "a/1.jpg", "c.webp", "a/0.jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png(1))
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path)
    assert [src[i]["id"] for i in range(len(src))] == ["a/0.jpeg", "a/1.jpg", "b/2.PNG", "c.webp"]
    assert src[0]["image"] == png(1)
    assert len(ImageFolderSource(tmp_path, extensions=("png",))) == 1


def test_array_record_roundtrip(tmp_path):
    records = [{"id": f"r{i}", "image": png(i), "captions": [f"grey {i}"]} for i in range(7)]
    assert write_array_record(tmp_path / "part-0.arrayrecord", records[:4]) == 4
    write_array_record(tmp_path / "part-1.arrayrecord", records[4:])
    src = ArrayRecordSource(str(tmp_path / "part-*.arrayrecord"))
    assert len(src) == 7
    assert src[5] == records[5]
    with pytest.raises(TypeError):
        write_array_record(tmp_path / "bad.arrayrecord", [{"id": "x", "image": np.zeros(3)}])


def test_tfds_source_reads_prepared_array_record_dataset(tfds_dir):
    src = TfdsSource("tiny_captioned_images", "train", tfds_dir)
    assert len(src) == NUM_EXAMPLES["train"]
    ids = {src[i]["id"] for i in range(len(src))}
    assert ids == {f"tiny_captioned_images/image/id={i}" for i in range(NUM_EXAMPLES["train"])}
    rec = src[0]
    assert isinstance(rec["image"], bytes)  # kept encoded: decoded later, under guard
    idx = int(rec["id"].rsplit("=", 1)[1])
    assert rec["captions"][0] == f"picture {idx} caption 0"
    assert len(rec["captions"]) == 2 + idx % 2 and rec["label"] == idx % 3
    sliced = TfdsSource("tiny_captioned_images:1.0.0", "validation[:2]", tfds_dir)
    assert len(sliced) == 2


def test_tfds_source_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared") as e:
        TfdsSource("coco_captions/2014", "validation", tmp_path)
    assert str(tmp_path / "coco_captions" / "2014") in str(e.value)
    assert "Nothing is downloaded" in str(e.value)


def test_source_from_spec_accepted_forms(tmp_path, tfds_dir):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(png(3))
    write_array_record(tmp_path / "a.arrayrecord", [{"id": "a", "image": png(1)}])
    assert isinstance(source_from_spec(str(tmp_path / "imgs")), ImageFolderSource)
    assert isinstance(source_from_spec(f"folder:{tmp_path / 'imgs'}"), ImageFolderSource)
    ar = source_from_spec(f"arrayrecord:{tmp_path / '*.arrayrecord'}")
    assert isinstance(ar, ArrayRecordSource) and len(ar) == 1
    tf = source_from_spec(f"tfds:tiny_captioned_images:1.0.0:train[:3]@{tfds_dir}")
    assert isinstance(tf, TfdsSource) and len(tf) == 3


@pytest.mark.parametrize("spec, error, match", [
    ("", ValueError, "accepted source specs"),
    ("s3://bucket/images", ValueError, "(?s)unrecognised source spec.*accepted source specs"),
    ("tfds:coco captions:val", ValueError, "(?s)malformed tfds spec.*tfds:NAME"),
    ("tfds:coco_captions/2014", ValueError, "malformed tfds spec"),   # no split
    ("folder:/does/not/exist", ValueError, "(?s)does not exist.*arrayrecord:GLOB"),
    ("arrayrecord:", ValueError, "without a path"),
    ("arrayrecord:/does/not/exist/*.ar", FileNotFoundError, "no array_record files match"),
    ("tfds:coco_captions/2014:validation@/does/not/exist", FileNotFoundError, "not prepared"),
])
def test_source_from_spec_errors(spec, error, match):
    with pytest.raises(error, match=match):
        source_from_spec(spec)
