"""Few-shot captioning, scored by CIDEr-D as the COCO caption evaluation scores it.

The scorer on examples worked out by hand, then against the COCO toolkit itself (pycocoevalcap, when
installed: `pip install -e '.[coco]'`), then `python -m dediffusion_jax.fewshot --task caption` end to
end against a stub model served over HTTP on localhost: the files it writes, supports paired across
text sources, and a rerun that asks the model nothing."""

from __future__ import annotations

import json
import math
import random
import shutil
import threading

import pytest

from dediffusion_jax.fewshot import support
from dediffusion_jax.fewshot.__main__ import main as fewshot_main
from dediffusion_jax.fewshot.cider import cider_d, corpus_cider_d, tokenize
from dediffusion_jax.fewshot.serve import make_server

# In the comments below L = log 2: with two images, an n-gram in one image's references weighs log 2 - log 1.
B_REFS = ["red car parked outside"]   # a second image: no word in common with the first


# ------------------------------------------------------------------------------- CIDEr-D by hand


def test_the_same_four_words_as_the_single_reference_score_10():
    # Image A's reference "black dog runs fast", image B's "red car parked outside": every n-gram of
    # orders 1-4 is in one image's references, so its idf is log 2 - log 1 and its tf 1; the
    # candidate's vector equals the reference's at every order (cosine 1, no length penalty).
    # 10 x mean over the 4 orders of 1 = 10.
    scores = cider_d(["black dog runs fast", "red car parked outside"], [["black dog runs fast"], B_REFS])
    assert scores == pytest.approx([10.0, 10.0])
    # case and punctuation are the tokenizer's business; "A" shares nothing with B's: the mean is 5
    assert corpus_cider_d(["Black dog, runs fast.", "A"], [["black dog runs fast"], B_REFS]) == pytest.approx(5.0)


def test_one_image_alone_scores_0_because_idf_is_log_1():
    # N = 1: every n-gram's weight is log 1 - log 1 = 0 (the toolkit gives 0 too).
    assert cider_d(["black dog runs fast"], [["black dog runs fast"]]) == [0.0]


def test_no_ngram_in_common_scores_0():
    assert cider_d(["green bird flies", "red car parked outside"], [["black dog runs fast"], B_REFS])[0] == 0.0


def test_the_gaussian_length_penalty_and_the_missing_higher_orders():
    # candidate "red car" vs reference "red car parked outside", all weights log 2:
    #   unigrams: dot 2L^2 / (sqrt(2)L * 2L)  = 1/sqrt(2)
    #   bigrams:  dot L^2  / (L * sqrt(3)L)    = 1/sqrt(3)
    #   3-, 4-grams: the candidate has none    = 0
    #   length 2 vs 4: penalty exp(-(2-4)^2 / (2 * 6^2)) = exp(-1/18)
    # 10 x (1/sqrt(2) + 1/sqrt(3)) / 4 x exp(-1/18) = 3.0377
    cosines = 1 / math.sqrt(2) + 1 / math.sqrt(3)
    expected = 10 * cosines / 4 * math.exp(-1 / 18)
    scores = cider_d(["black dog runs fast", "red car"], [["black dog runs fast"], B_REFS])
    assert scores[1] == pytest.approx(expected) and expected == pytest.approx(3.0377, abs=1e-4)
    # a huge sigma removes the penalty and leaves the cosines
    no_penalty = cider_d(["black dog runs fast", "red car"], [["black dog runs fast"], B_REFS], sigma=1e9)
    assert no_penalty[1] == pytest.approx(10 * cosines / 4)


def test_a_repeated_word_is_clipped_by_the_reference_count():
    # candidate "dog dog dog dog" (4 words: no length penalty) vs "black dog runs fast":
    #   unigrams: candidate {dog: 4L}, reference {black, dog, runs, fast: L each};
    #     clipped dot = min(4L, L) * L = L^2; norms 4L and 2L -> 1/8   (plain cosine: 4L^2/8L^2 = 1/2)
    #   "dog dog", "dog dog dog", ...: not in the reference -> 0
    # 10 x (1/8) / 4 = 0.3125   (without clipping it would be 1.25)
    scores = cider_d(["dog dog dog dog", "red car parked outside"], [["black dog runs fast"], B_REFS])
    assert scores[0] == pytest.approx(0.3125)


def test_scores_are_averaged_over_the_references():
    # identical to the first reference (4 orders x cosine 1), nothing in common with the second:
    # 10 x (4 + 0) / 4 / 2 references = 5.0
    refs = [["black dog runs fast", "small puppy sleeps inside"], B_REFS]
    assert cider_d(["black dog runs fast", "red car parked outside"], refs)[0] == pytest.approx(5.0)


def test_a_word_in_every_images_references_weighs_nothing():
    # "a" is in both images' references: idf log 2 - log 2 = 0, so "a" alone scores 0, and
    # "a black dog" matches on its other 1-, 2- and 3-grams (cosine 1 each) but has no 4-gram:
    # 10 x 3 / 4 = 7.5
    refs = [["a black dog"], ["a red car"]]
    assert cider_d(["a", "a red car"], refs)[0] == 0.0
    assert cider_d(["a black dog", "a red car"], refs) == pytest.approx([7.5, 7.5])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2 candidates for 1 reference sets"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a", "b"], [["a"], []])


# -------------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("caption, tokens", [
    ("A Dog's toy, on the grass!", ["a", "dog", "'s", "toy", "on", "the", "grass"]),
    ("A black-and-white photo of 3.5 cats...", ["a", "black-and-white", "photo", "of", "3.5", "cats"]),
    ("I cannot see the U.S. flag", ["i", "can", "not", "see", "the", "u.s.", "flag"]),
    ("The bus (a red one) isn't parked.", ["the", "bus", "-lrb-", "a", "red", "one", "-rrb-", "is", "n't", "parked"]),
    ('A "big" pizza & a 50% discount', ["a", "big", "pizza", "&", "a", "50", "%", "discount"]),
])
def test_tokenisation_is_the_coco_toolkits(caption, tokens):
    """What the toolkit's PTB tokenizer (lower case, punctuation tokens dropped) gives, checked by hand
    against it (and by `test_tokenize_agrees_with_the_toolkits_ptb_tokenizer`)."""
    assert tokenize(caption) == tokens


# --------------------------------------------------------------------- parity with the COCO toolkit


def made_up_sets(count: int = 36):
    """Caption sets with repeats, 1-word and empty captions, 1-5 references, 2-8 images."""
    vocab = "a the dog cat red car on sits runs street man with two".split()
    for seed in range(count):
        rng = random.Random(seed)

        def caption() -> str:
            return " ".join(rng.choice(vocab[:rng.randint(3, len(vocab))])
                            for _ in range(rng.randint(0 if rng.random() < 0.1 else 1, 12)))

        refs = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(2, 8))]
        yield [caption() if rng.random() > 0.2 else rng.choice(r) for r in refs], refs


def test_cider_d_equals_the_toolkits_cider():
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap is not installed "
                                    "(pip install -e '.[coco]'): the parity check with the COCO toolkit is skipped")
    for cands, refs in made_up_sets():
        mean, per_image = cider_mod.Cider().compute_score(dict(enumerate(refs)),
                                                          {i: [c] for i, c in enumerate(cands)})
        ours = cider_d(cands, refs, tokenizer=str.split)   # the toolkit's scorer takes tokenised text
        assert ours == pytest.approx(list(per_image), abs=1e-9)
        assert sum(ours) / len(ours) == pytest.approx(mean, abs=1e-9)


# written before the tokenizer (the first 20) and after it (the rest); the two known differences
KNOWN_DIFFERENCES = {"People at St. Mark's square",     # PTB keeps the period of listed abbreviations
                     "Sheep grazing in a field?!"}      # and keeps "?!" as a token
TOKENIZER_CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "A dog's toy, on the grass!", "Two people don't like it; really?",
    "A black-and-white photo of a cat.", "The bus (a red one) is parked.", 'A "big" pizza with 3.5 slices...',
    "It's a man's world -- isn't it?", "People at St. Mark's square", "A cat & a dog", "I cannot see the U.S. flag",
    "A woman's hand holding a cell-phone", "There are 2 giraffes: one tall, one short.", "A plate of food w/ rice",
    "they're going to the park", "A sign that reads 'STOP'", "A kitchen with a stove, sink, and refrigerator.",
    "Man in a 50% off shirt", "A yellow fire hydrant on the side of a road", "gonna be fun",
    "A person's  feet   on a skateboard", "A boy [left] throws a frisbee.", "Two dogs {brown} play.",
    "A clock reads 10:30 on the tower.", "The cat's paws aren't dirty!", "A man, a woman and a child walk by.",
    "An old-fashioned car; very shiny.", 'Someone wrote "hello" on the wall', "A pizza that is cut into 8 slices",
    "Sheep grazing in a field?!", "A tennis player swings at the ball...", "Bananas for $2 at a market",
    "A plane flying over the sea - at dusk", "A bathroom with a toilet & sink.", "The train's going to arrive at 5 p.m.",
    "A child's birthday cake with #1 candle", "It is a 2-story house", "We'll see the elephants",
    "A living room w/ a TV and a couch", "You've got mail", "A close-up of a cat's face: eyes wide open."]


def test_tokenize_agrees_with_the_toolkits_ptb_tokenizer():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer", reason="pycocoevalcap is not installed "
                              "(pip install -e '.[coco]'): the tokenizer parity check is skipped")
    if shutil.which("java") is None:
        pytest.skip("no java: the toolkit's PTB tokenizer is a Java program")
    theirs = ptb.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(TOKENIZER_CAPTIONS)})
    differ = {c for i, c in enumerate(TOKENIZER_CAPTIONS) if theirs[i][0].split() != tokenize(c)}
    assert differ == KNOWN_DIFFERENCES


# ------------------------------------------------------------------------------------ the command


class CopyModel:
    """Captions an image with its context; with a blank context, with the first support caption (a
    model that reads only the format). Ignores the stop strings, as some servers do."""

    identity = "copy"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def complete(self, prompts_, *, max_tokens, stop):
        self.prompts += list(prompts_)
        return [f" {self.caption(p)}$\nMS COCO image captioning." for p in prompts_]

    @staticmethod
    def caption(prompt: str) -> str:
        *shots, query = prompt.split("\n")
        context = query.split("Image context:")[1].split("MS COCO image caption:")[0].strip()
        return context or (shots[0].split("MS COCO image caption:")[1].strip().rstrip("$") if shots else "")


@pytest.fixture
def copy_server():
    model = CopyModel()
    srv = make_server(model, "127.0.0.1", 0, model_name="copy")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", model
    srv.shutdown()
    srv.server_close()


EVAL = {"e0": ["A black dog runs on the beach.", "A dog running along the sea shore.", "A black dog at the beach"],
        "e1": ["A red car parked on a street.", "A small red car by the curb."],
        "e2": ["Two cats sleep on a sofa.", "Two cats sleeping on a couch together."],
        "e3": ["A man rides a bike down a hill.", "A cyclist going downhill on a road."]}
TRAIN = {f"t{i}": [c] for i, c in enumerate(["A bowl of fruit on a table.", "A plane in a blue sky.",
                                              "A bus at a stop.", "A pizza with cheese.", "A boat on a lake.",
                                              "A clock on a tower."])}


def write_files(folder):
    rows = [{"image_id": i, "captions": c} for i, c in EVAL.items()] + \
           [{"image_id": i, "captions": c, "split": "train"} for i, c in TRAIN.items()]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [{"id": i, "text": c[0]} for i, c in {**EVAL, **TRAIN}.items()]   # a text source: 1st caption
    (folder / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    return folder / "captions.jsonl", folder / "texts.jsonl"


def test_the_caption_task_end_to_end_and_a_rerun_asks_nothing(tmp_path, copy_server, capsys):
    url, model = copy_server
    questions, texts = write_files(tmp_path)
    argv = ["--task", "caption", "--texts", f"first caption={texts}", "--blank", "--questions", str(questions),
            "--llm", url, "--shots", "0,2", "--pseudo-shots", "1", "--out", str(tmp_path / "out")]
    assert fewshot_main(argv) == 0
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "caption" and res["questions"] == 4 and res["support_pool"] == 6
    assert res["settings"]["max_tokens"] == 32
    # 16 prompts (2 sources x 2 k x 4 images); blank ones that drew the same supports are asked once
    asked = len(model.prompts)
    assert res["cache"] == {"hits": 0, "misses": asked} and asked == len(set(model.prompts)) <= 16
    refs = list(EVAL.values())
    first = [c[0] for c in refs]

    # the context is the first reference caption, and the model copies it at every k
    for k in ("0", "2"):
        assert res["sources"]["first caption"][k]["all"] == {"cider": pytest.approx(corpus_cider_d(first, refs)),
                                                              "n": 4}
    # blank context: the model copies the first support caption, drawn by (seed, image id, k) as for VQA
    pseudo = [support.sample_support(list(TRAIN.items()), 1, 0, f"{i}/0")[0][1][0] for i in EVAL]
    assert res["sources"]["blank (no image context)"]["0"]["all"]["cider"] == pytest.approx(corpus_cider_d(pseudo, refs))

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * 2 * 4
    assert preds[0] == {"source": "first caption", "shots": 0, "image_id": "e0", "prediction": first[0],
                        "captions": EVAL["e0"], "score": pytest.approx(cider_d(first, refs)[0])}
    assert [p["prediction"] for p in preds if p["source"].startswith("blank") and p["shots"] == 0] == pseudo

    # supports are paired: at k = 2 the blank source copies the first support caption of the prompt
    # that the text source got for the same image (its query's context is the image's first caption)
    first_support = {}
    for p in model.prompts:
        lines = p.split("\n")
        query = lines[-1].split("Image context: ")[1].split(" MS COCO image caption:")[0]
        if len(lines) == 3 and not query.startswith("MS COCO"):
            first_support[query] = lines[0].split("MS COCO image caption: ")[1].rstrip("$")
    blank_2 = [p["prediction"] for p in preds if p["source"].startswith("blank") and p["shots"] == 2]
    assert blank_2 == [first_support[c] for c in first]

    table = (out / "results.md").read_text()
    cell = f"{100 * corpus_cider_d(first, refs):.1f}"
    assert "## Few-shot caption: 4 images, http:" in table and "CIDEr-D x100" in table
    assert f"| first caption | {cell} | {cell} |" in table and "| text source | 0-shot | 2-shot |" in table
    assert f"| first caption | {cell} | {cell} |" in capsys.readouterr().out

    assert fewshot_main(argv) == 0   # the rerun: every answer from the cache
    again = json.loads((out / "results.json").read_text())
    assert len(model.prompts) == asked and again["cache"] == {"hits": 16, "misses": 0}
    assert again["sources"] == res["sources"]


def test_caption_task_user_errors_are_one_line(tmp_path, capsys):
    questions, texts = write_files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": "e0", "caption": "A dog."}\n')
    common = ["--task", "caption", "--texts", str(texts), "--llm", "http://127.0.0.1:9/v1", "--llm-model", "m",
              "--out", str(tmp_path / "o")]
    cases = [(["--questions", str(bad)], 'bad.jsonl:1: a captioning row needs "image_id" and "captions"'),
             (["--questions", str(questions), "--shots", "0,8"], "the support pool has 6 images; --shots 0,8")]
    for argv, needle in cases:
        assert fewshot_main([*common, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
