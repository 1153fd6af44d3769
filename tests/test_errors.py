"""User errors are one `error: ...` line and a non-zero exit in every command (issue 17, #3 and #6);
`--debug` shows the traceback; a genuine bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dediffusion_jax import encode, errors
from dediffusion_jax.data import pipeline, sources
from dediffusion_jax.train import checkpoint as ckpt_lib, cli

REPO = Path(__file__).resolve().parents[1]
WORLD = "projects/miniworld/configs/world.py"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------- run_main


def test_run_main_reports_user_errors_in_one_line_and_keeps_bugs_loud(capsys):
    def raising(e):
        def main(argv):
            raise e
        return main

    assert errors.run_main(raising(ckpt_lib.CheckpointError("no checkpoint here")), []) == 2
    assert one_error_line(capsys) == "error: no checkpoint here"
    assert errors.run_main(raising(FileNotFoundError(2, "No such file or directory", "/x/y")), []) == 2
    assert one_error_line(capsys) == "error: No such file or directory: /x/y"
    with pytest.raises(ckpt_lib.CheckpointError):  # --debug: the traceback
        errors.run_main(raising(ckpt_lib.CheckpointError("x")), ["--debug"])
    with pytest.raises(ZeroDivisionError):  # a bug is not the user's error
        errors.run_main(raising(ZeroDivisionError("bug")), [])
    with pytest.raises(OSError):  # an OSError that names no file is not about the user's path
        errors.run_main(raising(OSError("device busy")), [])


def test_the_project_error_types_are_user_errors_and_keep_their_builtin_bases():
    from dediffusion_jax import config, extensions, weights
    from dediffusion_jax.data.preprocess import CorruptExampleError
    from dediffusion_jax.evaluation import evaluators, fid
    from dediffusion_jax.t2i import convert, folder

    for kind, base in [(ckpt_lib.CheckpointError, RuntimeError), (folder.DecoderFolderError, ValueError),
                       (weights.WeightsError, ValueError), (weights.MissingWeightsError, FileNotFoundError),
                       (CorruptExampleError, ValueError), (config.ConfigArgError, ValueError),
                       (evaluators.EvaluatorConfigError, ValueError), (fid.StatsFileError, ValueError),
                       (convert.CheckpointMismatchError, ValueError), (extensions.ExtensionError, ImportError),
                       (sources.SourceError, FileNotFoundError), (sources.SourceSpecError, ValueError),
                       (pipeline.DataSourceError, RuntimeError), (cli.UsageError, ValueError)]:
        assert issubclass(kind, errors.UserError) and issubclass(kind, base), kind


# ------------------------------------------------------------------------------------- train


def test_a_tuple_override_with_a_bad_value_names_the_key():
    with pytest.raises(cli.UsageError, match=r"loss\.timestep_range expects a tuple of float"):
        cli.validate_command_line(["--config", f"{REPO}/{WORLD}", "--workdir", "w",
                                   "--config.loss.timestep_range=abc"])


def test_train_with_an_empty_source_folder_is_one_line_without_a_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "dediffusion_jax.train", "--config", WORLD, "--workdir",
         str(tmp_path / "run"), f"--config.data.source=folder:{tmp_path / 'empty'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors_ == [f"error: no images with extensions ['jpeg', 'jpg', 'png', 'webp'] under "
                       f"'{tmp_path / 'empty'}'"]


def test_train_reports_a_source_of_only_broken_files_in_one_line(monkeypatch, capsys):
    """What the pipeline raises after max_consecutive_failures broken files (test_data_pipeline shows
    it raising) reaches the user as one line; --debug gives the traceback; a bug stays a traceback."""
    from dediffusion_jax.train import loop

    config = cli.load_config_file(f"{REPO}/{WORLD}")
    monkeypatch.setattr(loop, "load_decoder_for", lambda config: None)

    def broken_source(config, workdir, decoder=None):
        raise pipeline.DataSourceError("1000 consecutive examples failed to load (last: b5.png: ...)")

    monkeypatch.setattr(loop, "train_and_evaluate", broken_source)
    assert cli.run_training(config, "w") == 2
    assert one_error_line(capsys).startswith("error: 1000 consecutive examples failed to load")
    with pytest.raises(pipeline.DataSourceError):
        cli.run_training(config, "w", debug=True)

    def corrupt_checkpoint(config, workdir, decoder=None):
        raise ckpt_lib.CheckpointError("failed to restore checkpoint step 4")

    monkeypatch.setattr(loop, "train_and_evaluate", corrupt_checkpoint)
    assert cli.run_training(config, "w") == 1  # a checkpoint error: status 1, printed once
    assert one_error_line(capsys) == "error: failed to restore checkpoint step 4"

    def bug(config, workdir, decoder=None):
        raise KeyError("a bug")

    monkeypatch.setattr(loop, "train_and_evaluate", bug)
    with pytest.raises(KeyError):
        cli.run_training(config, "w")


def test_the_restore_error_never_advises_deleting_a_checkpoint():
    text = (REPO / "dediffusion_jax/train/checkpoint.py").read_text().lower()
    assert "delete" not in text


# ------------------------------------------------------------------------------------- encode


class _FailingEncoder:
    """An encoder whose second batch fails (a bug or an interrupt half-way through the file)."""

    batch_size = 1

    def __init__(self):
        from dediffusion_jax.data.preprocess import PreprocessConfig

        self.preprocess = PreprocessConfig(backbone_size=8, decoder_size=8)
        self.calls = 0

    def token_ids(self, views):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return np.zeros((len(views), 3), np.int32)

    def texts_of_ids(self, ids):
        return ["a text"] * len(ids)


def test_encode_leaves_no_tmp_file_and_prints_each_skip_once(tmp_path, capsys):
    from test_encode import write_pngs

    write_pngs(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "texts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        encode.encode_to_jsonl([str(tmp_path / "imgs")], out, _FailingEncoder(), progress=True)
    assert not out.exists() and not (tmp_path / "texts.jsonl.tmp").exists()
    err = capsys.readouterr().err
    assert err.count("bad.png") == 1, err  # once: no progress bar redraws or second handler in a log

    summary = encode.encode_to_jsonl([str(tmp_path / "imgs")], out, _NoFailEncoder(), progress=True)
    err = capsys.readouterr().err
    assert summary["encoded"] == 3 and len(out.read_text().splitlines()) == 3
    assert err.count("bad.png") == 1 and err.count("encoded 3 images") == 1, err
    assert not (tmp_path / "texts.jsonl.tmp").exists()


class _NoFailEncoder(_FailingEncoder):
    def token_ids(self, views):
        return np.zeros((len(views), 3), np.int32)


def test_encode_cli_user_errors_are_one_line(tmp_path, capsys):
    from test_encode import write_pngs

    write_pngs(tmp_path / "imgs", 1)
    base = ["--images", str(tmp_path / "imgs"), "--no-progress"]
    assert encode.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.jsonl"),
                        *base]) == 2
    assert one_error_line(capsys).startswith("error: cannot load the encoder")
    # --out naming a folder is refused before anything is encoded (the encoder is never loaded)
    monkey_encoder = _NoFailEncoder()
    with pytest.raises(IsADirectoryError):
        encode.encode_to_jsonl(base[1:2], tmp_path / "imgs", monkey_encoder, progress=False)
    assert errors.run_main(lambda argv: encode.encode_to_jsonl(base[1:2], tmp_path / "imgs",
                                                             monkey_encoder, progress=False) and 0, []) == 2
    assert one_error_line(capsys) == f"error: --out is a folder, not a file: {tmp_path / 'imgs'}"
    assert not (tmp_path / "imgs.tmp").exists()


# ------------------------------------------------------------------------------ the other commands


def test_evaluate_generate_and_convert_report_bad_paths_in_one_line(tmp_path, capsys):
    from dediffusion_jax import evaluate, generate
    from dediffusion_jax.evaluation import convert_inception

    missing = tmp_path / "absent.safetensors"
    assert evaluate.main(["--images", str(tmp_path), "--decoder", str(tmp_path / "dec"), "--workdir",
                          str(tmp_path / "w"), "--captions", "longest", "--inception", str(missing)]) == 2
    assert str(missing) in one_error_line(capsys)
    assert generate.main(["--decoder", str(tmp_path / "dec"), "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert str(tmp_path / "dec") in one_error_line(capsys)
    assert convert_inception.main(["--input", str(tmp_path / "nope.pth"), "--output",
                                   str(tmp_path / "o.safetensors")]) == 2
    assert one_error_line(capsys) == f"error: No such file or directory: {tmp_path / 'nope.pth'}"


def test_world_programs_report_bad_paths_in_one_line(tmp_path, capsys):
    from projects.miniworld import classifier, demo, probe, tfds_builder

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert tfds_builder.main(["--data_dir", str(a_file / "data"), "--num_train", "4"]) == 2
    assert str(a_file) in one_error_line(capsys)
    assert probe.main(["--decoder", str(tmp_path / "no_decoder"), "--scenes", "2", "--draws", "1"]) == 2
    assert str(tmp_path / "no_decoder") in one_error_line(capsys)
    assert classifier.main(["--workdir", str(a_file), "--steps", "1", "--batch", "2",
                            "--out", str(tmp_path / "c")]) == 2
    assert str(a_file) in one_error_line(capsys)
    assert demo.main(["--workdir", str(a_file), "--steps", "1"]) == 2
    assert str(a_file) in one_error_line(capsys)
    with pytest.raises(FileExistsError):
        demo.main(["--workdir", str(a_file), "--steps", "1", "--debug"])


def test_pretrain_backbone_reports_a_bad_workdir_in_one_line(tmp_path, capsys):
    from projects.miniworld import pretrain_backbone

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert pretrain_backbone.main(["--workdir", str(a_file), "--steps", "1", "--batch", "2",
                                   "--out", str(tmp_path / "b")]) == 2
    assert str(a_file) in one_error_line(capsys)


def test_pretrain_decoder_reports_a_missing_init_folder_in_one_line(tmp_path, capsys):
    from projects.miniworld import pretrain_decoder

    assert pretrain_decoder.main(["--workdir", str(tmp_path / "w"), "--steps", "1", "--batch", "2",
                                  "--init-from", str(tmp_path / "no_decoder")]) == 2
    assert str(tmp_path / "no_decoder") in one_error_line(capsys)


def test_evaluate_on_a_missing_or_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    from dediffusion_jax import evaluate
    from test_encode import write_pngs

    write_pngs(tmp_path / "imgs", 2)
    (tmp_path / "corrupt" / "checkpoints" / "5").mkdir(parents=True)
    for checkpoint in (tmp_path / "nowhere", tmp_path / "corrupt"):
        argv = ["--images", str(tmp_path / "imgs"), "--decoder", str(tmp_path / "dec"), "--workdir",
                str(tmp_path / "w"), "--checkpoint", str(checkpoint), "--no-progress"]
        assert evaluate.main(argv, extractor=object()) == 2
        assert str(checkpoint) in one_error_line(capsys)
