"""Input data: random-access image sources, untrusted-image preprocessing, the grain pipeline.

    source = source_from_spec("tfds:coco_captions/2014:validation@/data/tfds")
    ds = make_dataset(source, global_batch_size=256, seed=0,
                      preprocess_fn=Preprocessor(PreprocessConfig(backbone_size=224, decoder_size=256)))
    it = iter(ds)                 # DataIterator: numpy batches, it.num_skipped, get_state/set_state
    batch = next(it)              # {'backbone': [b,224,224,3], 'decoder': [b,256,256,3], 'id': [b], ...}
"""

# The names below load lazily (PEP 562), so that `dediffusion_jax.data.preprocess` (all that
# inference needs) does not pull in grain through the pipeline.
_EXPORTS = {
    "pipeline": ("DataIterator", "Dataset", "make_dataset"),
    "preprocess": ("CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CorruptExampleError",
                   "PreprocessConfig", "Preprocessor", "decode_image", "join_captions",
                   "split_captions", "two_views"),
    "sources": ("SPEC_FORMS", "ArrayRecordSource", "ImageFolderSource", "ImageSource", "TfdsSource",
                "source_from_spec", "write_array_record"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


__all__ = [
    "ArrayRecordSource", "CLIP_MEAN", "CLIP_STD", "CorruptExampleError", "DataIterator", "Dataset",
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderSource", "ImageSource", "PreprocessConfig",
    "Preprocessor", "SPEC_FORMS", "TfdsSource", "decode_image", "join_captions", "make_dataset",
    "source_from_spec", "split_captions", "two_views", "write_array_record",
]
