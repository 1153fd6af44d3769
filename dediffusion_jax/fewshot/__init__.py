"""Text as the interface to a language model: the paper's few-shot evaluation (App. B).

An image becomes text (De-Diffusion text, a caption, nothing); a text-only language model reads it in
the paper's prompt formats and answers. The modules, one job each:

- `prompts`: the App. B formats, verbatim (VQA, captioning, classification with/without induction),
  the k-shot layout and zero-shot "pseudo samples";
- `scoring`: the answer before `$` (before the period for classification), normalisation, exact
  match, the VQA accuracy metric, the per-question-type breakdown;
- `cider`: CIDEr-D as the COCO caption evaluation computes it (scoring `--task caption`);
- `support`: support sets drawn by seed from the train split, and N-way K-shot episodes;
- `backends`: the one small `LanguageModel` interface, `open_llm(spec)`; `http_backend` (an
  OpenAI-compatible server), `local_backend` (a transformers folder), `cache` (answers on disk);
- `data`: the texts / questions files; `run`: text sources x shots; `report`: the tables;
- `__main__`: `python -m dediffusion_jax.fewshot`.

Standard library and numpy only at import time: torch and transformers load when a local model does.
"""
