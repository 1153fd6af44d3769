"""The miniature world: procedural scenes, captions, a CLIP-layout tokenizer, an attribute classifier
and metrics, so the paper's claims can be measured on a 2-core CPU (see docs/miniworld.md)."""
