"""The ablation runner (projects/miniworld/ablations.py): skips finished runs, resumes stopped ones, and
writes the paper-shaped tables from stored results. Training and evaluation are stand-ins here (the
reduced end-to-end run with the real ones is the slow test at the end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dediffusion_jax import errors
from projects.miniworld import ablations

TOY = ablations.Protocol(steps=8, scenes=8, ddim_steps=2, own_guidance=(1.0,), third_guidance=(1.0, 3.0))


def _scores(select: dict[str, float], report: dict[str, float], fid: float = 100.0) -> dict:
    """{half: {guidance: metrics}} with the given object accuracy per guidance."""
    def row(obj: float) -> dict:
        return {"object": obj, "colour": 0.5, "shape": 0.5, "occupancy": 0.8, "background": 0.9,
                "world_fid": fid, "world_kid": 0.05}
    return {"select": {g: row(v) for g, v in select.items()}, "report": {g: row(v) for g, v in report.items()}}


class Recorder:
    """Stand-in train/eval functions that count their calls; `stop_first` runs stop once, as SIGTERM would."""

    def __init__(self, stop_first: tuple[str, ...] = ()):
        self.trained, self.evaluated, self.stop_first = [], [], set(stop_first)

    def train(self, run, workdir, deadline):
        if run.name in self.stop_first:
            self.stop_first.discard(run.name)
            raise ablations.Stopped(f"{run.name} stopped at step 4 of {run.steps}")
        self.trained.append(run.name)
        return {"train_wall_s": 1.0}

    def evaluate(self, run, workdir, protocol, renderers):
        self.evaluated.append(run.name)
        obj = {"default": 0.3, "punct": 0.2, "depth1": 0.25, "depth4": 0.28}.get(run.setting.key, 0.1) + 0.01 * run.seed
        scores = _scores({"1.0": obj, "3.0": obj - 0.05}, {"1.0": obj, "3.0": obj - 0.05})
        return {"scores": {"third_party": scores, "training_decoder": scores},
                "text_statistics": {"recall": 0.5}, "distinct_texts": 3, "texts": ["red circle"]}

    def run(self, workdir, families=("punctuation",), seeds=(0,)):
        return ablations.run_families(list(families), workdir, TOY, seeds, train_fn=self.train,
                                      eval_fn=self.evaluate, references_fn=lambda *a: None)


def test_each_run_trains_once_and_a_finished_run_is_skipped(tmp_path):
    rec = Recorder()
    first = rec.run(tmp_path, families=("punctuation", "depth"), seeds=(0, 1))
    # The world default appears in both families: trained once per seed.
    assert sorted(rec.trained) == sorted(["default_steps8_seed0", "punct_steps8_seed0", "depth1_steps8_seed0",
                                          "depth4_steps8_seed0", "default_steps8_seed1", "punct_steps8_seed1",
                                          "depth1_steps8_seed1", "depth4_steps8_seed1"])
    assert first["stopped"] is None and len(first["finished"]) == 8

    again = rec.run(tmp_path, families=("punctuation", "depth"), seeds=(0, 1))
    assert again["finished"] == [] and len(again["skipped"]) == 8 and len(rec.trained) == 8

    # A run whose evaluation was lost is evaluated again, not retrained.
    (tmp_path / "runs" / "punct_steps8_seed0" / "result.json").unlink()
    rec.run(tmp_path, families=("punctuation",), seeds=(0, 1))
    assert len(rec.trained) == 8 and rec.evaluated.count("punct_steps8_seed0") == 2


def test_a_stopped_run_is_resumed_by_the_same_command(tmp_path):
    rec = Recorder(stop_first=("punct_steps8_seed0",))
    first = rec.run(tmp_path)
    assert first["stopped"].startswith("punct_steps8_seed0 stopped at step 4")
    assert first["finished"] == ["default_steps8_seed0"]
    assert not (tmp_path / "runs" / "punct_steps8_seed0" / "result.json").exists()
    # What finished before the stop is already in the tables.
    assert "excluded (world default)" in (tmp_path / "ablations.md").read_text()

    second = rec.run(tmp_path)
    assert second == {"finished": ["punct_steps8_seed0"], "skipped": ["default_steps8_seed0"], "stopped": None}


def test_the_guidance_is_chosen_on_the_select_half_and_reported_on_the_other():
    scores = _scores(select={"1.0": 0.40, "3.0": 0.30}, report={"1.0": 0.20, "3.0": 0.50})
    assert ablations.chosen(scores)["guidance"] == "1.0"
    assert ablations.chosen(scores)["object"] == 0.20  # not the report half's best, 0.50


def _store(workdir: Path, name: str, setting: str, seed: int, select: float, report: float) -> None:
    scores = _scores({"1.0": select}, {"1.0": report}, fid=200.0 - 100 * report)
    path = workdir / "runs" / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run": name, "family_setting": setting, "seed": seed, "steps": 8,
                                "scores": {"third_party": scores, "training_decoder": scores},
                                "text_statistics": {"recall": 0.6}}))


def test_the_tables_and_plots_are_written_from_stored_results(tmp_path):
    # Three seeds of two token counts; 4 tokens looks best on the REPORT half but 2 tokens is best on
    # the SELECT half, which is what chooses the best setting.
    for seed, (s2, r2, s4, r4) in enumerate([(0.5, 0.30, 0.4, 0.60), (0.5, 0.31, 0.4, 0.62), (0.5, 0.32, 0.4, 0.61)]):
        _store(tmp_path, f"tokens2_steps8_seed{seed}", "tokens2", seed, s2, r2)
        _store(tmp_path, f"tokens4_steps8_seed{seed}", "tokens4", seed, s4, r4)
    aggs = ablations.write_report(tmp_path, TOY, ["tokens"], [0, 1, 2])
    tokens = aggs["tokens"]
    assert tokens["best_on_select_half"] == "tokens2"
    assert tokens["rows"]["tokens4"]["third_party"]["object"]["mean"] == pytest.approx(0.61)
    assert tokens["rows"]["tokens4"]["third_party"]["object"]["std"] == pytest.approx(0.01)
    assert tokens["rows"]["tokens14"]["third_party"]["object"]["n"] == 0  # not run yet: shown as …
    table = (tmp_path / "ablations.md").read_text()
    assert "| **2** | 5: 9.19 / 97.8 | 0.310 ± 0.010 |" in table  # the paper's row beside ours
    assert "| 4 | 15: 7.42 / 97.6 | 0.610 ± 0.010 |" in table
    assert (tmp_path / "plots" / "tokens.png").stat().st_size > 5000
    stored = json.loads((tmp_path / "ablations.json").read_text())
    assert set(stored["runs"]) == {f"tokens{t}_steps8_seed{s}" for t in (2, 4) for s in range(3)}


def test_a_command_for_one_family_and_one_seed_keeps_the_whole_table(tmp_path):
    """Adding a seed of one family (`--family tokens --seeds 2`) rewrites the report: the other
    families and the family's other seeds stay in it."""
    for seed in (0, 1, 2):
        _store(tmp_path, f"tokens2_steps8_seed{seed}", "tokens2", seed, 0.5, 0.30 + 0.01 * seed)
    for seed in (0, 1):
        _store(tmp_path, f"punct_steps8_seed{seed}", "punct", seed, 0.5, 0.4)
    aggs = ablations.write_report(tmp_path, TOY, ["tokens"], [2])
    assert list(aggs) == ["punctuation", "tokens"]  # in the runner's order
    assert aggs["tokens"]["rows"]["tokens2"]["seeds"] == [0, 1, 2]
    assert aggs["tokens"]["rows"]["tokens2"]["third_party"]["object"]["mean"] == pytest.approx(0.31)
    assert aggs["punctuation"]["rows"]["punct"]["seeds"] == [0, 1]
    table = (tmp_path / "ablations.md").read_text()
    assert "### Punctuation" in table and "### Number of tokens" in table


def test_a_difference_is_called_beyond_the_spread_only_when_it_is():
    results = {}
    for seed, (a, b) in enumerate([(0.30, 0.40), (0.32, 0.42)]):
        for key, value in (("default", a), ("punct", b)):
            s = _scores({"1.0": value}, {"1.0": value})
            results[f"{key}_steps8_seed{seed}"] = {"scores": {"third_party": s, "training_decoder": s},
                                                   "text_statistics": {"recall": 0.5}}
    agg = ablations.aggregate(ablations.FAMILIES["punctuation"], results, TOY, [0, 1])
    vs = agg["rows"]["punct"]["vs_paper_choice"]
    assert vs["object_diff"] == pytest.approx(0.10) and vs["beyond_spread"]
    # One seed each: no spread to compare with, never "beyond".
    one = ablations.aggregate(ablations.FAMILIES["punctuation"], results, TOY, [0])
    assert not one["rows"]["punct"]["vs_paper_choice"]["beyond_spread"]


def test_a_workdir_keeps_one_protocol(tmp_path):
    Recorder().run(tmp_path)
    with pytest.raises(errors.UserError, match="another protocol.*steps"):
        ablations.run_families(["punctuation"], tmp_path, ablations.Protocol(steps=9, scenes=8), [0],
                               train_fn=None, eval_fn=None, references_fn=lambda *a: None)


def test_each_setting_is_a_world_config_with_its_seed_and_steps(tmp_path):
    tokens2 = ablations.Run(ablations.FAMILIES["tokens"].settings[0], seed=2, steps=40)
    config = ablations.run_config(tokens2, tmp_path)
    assert (config.encoder.num_queries, config.seed, config.total_steps) == (2, 2, 40)
    assert config.lr.warmup_steps == 4 and not config.evals
    long_scratch = ablations.FAMILIES["backbone"].settings[3]
    assert ablations.FULL.steps_of(long_scratch) == 2 * ablations.FULL.steps
    assert ablations.FULL.steps_of(ablations.FAMILIES["length"].settings[0]) == ablations.FULL.steps // 2
    halves = ablations.FULL.halves()
    assert len(halves["select"]) == len(halves["report"]) == 128
    assert not set(halves["select"].tolist()) & set(halves["report"].tolist())


def test_published_runs_are_taken_as_done_on_another_machine(tmp_path):
    Recorder().run(tmp_path / "here")
    ablations.publish(tmp_path / "here", tmp_path / "docs")
    elsewhere = tmp_path / "fresh_clone"
    imported = ablations.import_published(elsewhere, tmp_path / "docs" / "ablations.json")
    assert sorted(imported) == ["default_steps8_seed0", "punct_steps8_seed0"]
    rec = Recorder()
    assert rec.run(elsewhere)["skipped"] == ["default_steps8_seed0", "punct_steps8_seed0"] and rec.trained == []
    # A published table of another protocol is refused, not mixed in.
    with pytest.raises(errors.UserError, match="another protocol"):
        (elsewhere / "protocol.json").write_text(json.dumps({"steps": 600}))
        ablations.import_published(elsewhere, tmp_path / "docs" / "ablations.json")


def test_a_run_finished_before_the_llm_column_gets_it_on_the_next_command(tmp_path):
    rec = Recorder()
    rec.run(tmp_path)  # stand-in results carry no "llm"
    asked = []

    def llm(name, workdir, protocol):
        asked.append(name)
        return {"all": 0.55 if name.startswith("default") else 0.40, "informative": 0.6, "by_type": {}, "n": 4}

    caption = _scores({"1.0": 0.2}, {"1.0": 0.2})
    (tmp_path / "references.json").write_text(json.dumps({"short caption": {"third_party": caption,
                                                                            "training_decoder": caption}}))
    (tmp_path / ablations.REFERENCES_LLM).write_text(json.dumps({"short caption": {"all": 0.395}}))
    ablations.run_families(["punctuation"], tmp_path, TOY, [0], train_fn=rec.train, eval_fn=rec.evaluate,
                           references_fn=lambda *a: None, llm_fn=llm)
    assert asked == ["default_steps8_seed0", "punct_steps8_seed0"] and rec.trained == ["default_steps8_seed0",
                                                                                        "punct_steps8_seed0"]
    table = (tmp_path / "ablations.md").read_text()
    assert "world-LLM VQA % ↑" in table
    assert "| 0.500 | 55.0 | 1 | — |" in table and "| 0.500 | 40.0 | 1 | -0.100 (within spread) |" in table
    assert "| *short caption* |" in table and "| 100.0 | — | 39.5 | — | — |" in table
    # Filled in once: the next command asks nothing.
    ablations.run_families(["punctuation"], tmp_path, TOY, [0], train_fn=rec.train, eval_fn=rec.evaluate,
                           references_fn=lambda *a: None, llm_fn=llm)
    assert len(asked) == 2


def test_the_command_names_a_bad_family():
    assert ablations.main(["--family", "colour", "--workdir", "/tmp/x"]) == 2


@pytest.mark.slow
def test_the_reduced_mode_end_to_end(tmp_path, capsys):
    """Real training, the real third-party model and decoder, at toy size; one run is stopped halfway
    (as SIGTERM would) and resumed from its checkpoint by the same command."""
    from dediffusion_jax.train.loop import train_and_evaluate

    stopped = {"done": False}

    def stop_halfway(run, workdir, deadline):
        if not stopped["done"]:
            stopped["done"] = True
            summary = train_and_evaluate(ablations.run_config(run, workdir), workdir / "runs" / run.name / "train",
                                         stop_after_steps=run.steps // 2)
            assert summary["preempted"]
            raise ablations.Stopped(f"{run.name} stopped at step {summary['step']}")
        return ablations.train_run(run, workdir, deadline)

    workdir = tmp_path / "abl"
    first = ablations.run_families(["punctuation"], workdir, ablations.REDUCED, [0], train_fn=stop_halfway)
    assert first["stopped"] and first["finished"] == []
    second = ablations.main(["--family", "punctuation", "--seeds", "0", "--reduced", "--workdir", str(workdir),
                             "--publish", str(tmp_path / "published")])
    assert second == 0
    trained = json.loads((workdir / "runs" / "default_steps8_seed0" / "trained.json").read_text())
    assert trained["start_step"] == 4  # resumed from the checkpoint, not retrained
    result = json.loads((workdir / "runs" / "punct_steps8_seed0" / "result.json").read_text())
    assert set(result["scores"]["third_party"]["report"]) == {"1.0", "3.0"}
    assert 0.0 <= result["scores"]["third_party"]["report"]["1.0"]["object"] <= 1.0
    assert result["llm"]["n"] > 0 and 0.0 <= result["llm"]["all"] <= 1.0  # the world LLM read the texts
    table = (tmp_path / "published" / "ablations.md").read_text()
    assert "excluded (world default)" in table and "6.43 / 97.0" in table and "short caption" in table
    assert (tmp_path / "published" / "plots" / "punctuation.png").is_file()
