"""Experiment configs build (shapes only, no big init) and the command line reports user errors clearly."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax import config as config_lib
from dediffusion_jax.train import cli, loop
from helpers import tiny_decoder as tiny

REPO = Path(__file__).resolve().parents[1]
PAPER = f"{REPO}/configs/paper.py"
MINIWORLD = f"{REPO}/projects/miniworld/configs/world.py"


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def decoder77():
    """Context 77 (= 75 tokens + SOS + EOS), as a CLIP text encoder; tiny otherwise."""
    return tiny.random_decoder("pixel", world_tokenizer.DEFAULT_DIR, seed=0, context_length=77)


def test_paper_config_has_the_paper_values_and_its_model_builds_abstractly(decoder77):
    c = cli.load_config_file(PAPER)
    assert (c.backbone.variant, c.backbone.image_size, c.backbone.frozen) == ("L/14", 280, True)
    assert (c.encoder.num_queries, c.encoder.pooler_blocks, c.encoder.pooler_width,
            c.encoder.pooler_heads) == (75, 5, 1024, 16)
    assert c.vocab.exclude_punctuation
    assert (c.quantizer.temperature.schedule, c.quantizer.temperature.start,
            c.quantizer.temperature.end) == ("exponential", 2.0, 0.3)
    assert (c.optimizer.name, c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay) == (
        "adafactor", 0.9, 0.999, 0.01)
    assert (c.batch_size, c.total_steps, c.lr.peak, c.lr.end, c.lr.warmup_steps) == (
        2048, 500_000, 3e-4, 3e-6, 10_000)
    parts = loop.build_parts(c, decoder77)
    state = parts.abstract_state  # jax.eval_shape: no FLOPs, no memory
    assert "backbone" not in state.params  # frozen: never in the optimizer
    # Pooler of the paper's size: ~84M + the vocabulary head (1024 x V + V; 50.6M at V = 49,408).
    vocab = decoder77.text_config.vocab_size
    pooler = n_params(state.params) - (1024 * vocab + vocab)
    assert 80e6 < pooler < 90e6, pooler
    assert 130e6 < pooler + 1024 * 49_408 + 49_408 < 140e6  # the paper's 135M trainable


def test_paper_runlocal_is_cpu_sized_and_builds(decoder77):
    c = cli.load_config_file(f"{PAPER}:runlocal,decoder=/some/sd2-base")
    assert c.decoder.path == "/some/sd2-base" and c.total_steps <= 20 and c.batch_size <= 8
    parts = loop.build_parts(c, decoder77)
    assert n_params(parts.abstract_state.params) < 200_000
    assert not c.backbone.frozen  # a random local backbone is trained, not frozen


def test_miniworld_config_fits_the_world_decoder_context(decoder77):
    c = cli.load_config_file(MINIWORLD)
    assert c.encoder.num_queries + 2 <= world_tokenizer.CONTEXT_LENGTH
    assert c.data.source == "miniworld:train" and c.batch_size == 32
    assert c.decoder.path.endswith("projects/miniworld/assets/decoder")
    parts = loop.build_parts(c, decoder77)
    assert parts.model.num_tokens == 12
    assert 0.5e6 < n_params(parts.abstract_state.params) < 2e6
    for arg, field, value in [("tokens=6", "num_queries", 6), ("depth=3", "pooler_blocks", 3)]:
        assert cli.load_config_file(f"{MINIWORLD}:{arg}").encoder[field] == value
    assert not cli.load_config_file(f"{MINIWORLD}:punct").vocab.exclude_punctuation
    assert not c.quantizer.hard and cli.load_config_file(f"{MINIWORLD}:relax=hard").quantizer.hard
    with pytest.raises(ValueError, match="relax"):
        cli.load_config_file(f"{MINIWORLD}:relax=straight")
    assert tuple(c.loss.timestep_range) == (0.5, 1.0) and not c.loss.timestep_range_final
    assert c.loss.reduction == "log_mean"
    top = cli.load_config_file(f"{MINIWORLD}:timesteps=top,reduction=mean").loss
    assert tuple(top.timestep_range) == (0.8, 1.0) and top.reduction == "mean"
    slide = cli.load_config_file(f"{MINIWORLD}:timesteps=slide").loss
    assert tuple(slide.timestep_range_final) == (0.5, 0.85) and slide.timestep_ramp_fraction == 1.0
    with pytest.raises(ValueError, match="timesteps"):
        cli.load_config_file(f"{MINIWORLD}:timesteps=low")
    with pytest.raises(ValueError, match="reduction"):
        cli.load_config_file(f"{MINIWORLD}:reduction=sum")


def test_config_file_arguments_are_typed():
    # As big_vision's parse_arg: the defaults give each argument its type.
    args = config_lib.parse_arg("tokens=6,punct,diversity=0.1,relax=hard,decoder=/sd",
                                tokens=12, punct=False, diversity=0.01, decoder="",
                                relax=config_lib.one_of("soft", "hard"), runlocal=False)
    assert (args.tokens, args.punct, args.diversity, args.decoder, args.relax, args.runlocal) == (
        6, True, 0.1, "/sd", "hard", False)
    assert config_lib.parse_arg("punct=false,runlocal=1", punct=True, runlocal=False).to_dict() == {
        "punct": False, "runlocal": True}
    assert config_lib.parse_arg(None, tokens=12).tokens == 12


@pytest.mark.parametrize("arg, message", [
    ("tokenz=8", "unknown config argument 'tokenz'; did you mean tokens? valid arguments: tokens=<int>, "
                 "punct=<bool>, relax=<soft|hard>"),
    ("tokens=many", "tokens='many': tokens expects int"),
    ("punct=maybe", "punct='maybe': punct is a bool"),
    ("relax=straight", "relax='straight'; choose soft or hard"),
])
def test_a_bad_config_argument_is_one_clear_error(arg, message):
    with pytest.raises(config_lib.ConfigArgError) as e:
        config_lib.parse_arg(arg, tokens=12, punct=False, relax=config_lib.one_of("soft", "hard"))
    assert str(e.value).startswith(message), str(e.value)


def test_config_files_declare_their_arguments():
    # `train --config FILE --help` lists a file's ARGS; get_config() is get_config(its defaults).
    for path, expected in [(PAPER, {"decoder", "backbone", "data", "runlocal"}),
                           (MINIWORLD, {"decoder", "backbone", "tokens", "depth", "punct", "steps", "relax",
                                        "timesteps", "reduction", "vocab", "diversity", "data", "images", "eval_every"})]:
        module = cli.load_config_module(path)
        assert set(module.ARGS) == expected
    assert cli.load_config_file(f"{MINIWORLD}:steps=7,diversity=0").total_steps == 7
    world = cli.load_config_file(MINIWORLD)  # evaluated while it trains, unless eval_every=0
    assert world.evals.world.type == "miniworld.reconstruction" and world.evals.world.every_steps == 250
    assert not cli.load_config_file(f"{MINIWORLD}:eval_every=0").evals


def test_the_tokenz_typo_is_an_error_not_a_silent_default(capsys, tmp_path):
    rc, err = run_cli(capsys, "--config", f"{MINIWORLD}:tokenz=8", "--workdir", str(tmp_path))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(
        f"error: {MINIWORLD}:tokenz=8: unknown config argument 'tokenz'; did you mean tokens?"), err
    rc, err = run_cli(capsys, "--config", f"{MINIWORLD}:tokens=8.5", "--workdir", str(tmp_path))
    assert rc == 2 and err.strip().endswith("tokens='8.5': tokens expects int"), err


def test_every_config_field_has_a_one_line_meaning():
    fields = config_lib.leaf_fields(config_lib.base_config())
    assert set(config_lib.FIELD_DOCS) == set(fields)
    assert all(doc and "\n" not in doc for doc in config_lib.FIELD_DOCS.values())
    tuples = {k for k, v in fields.items() if isinstance(v, (tuple, list))}
    assert set(config_lib.TUPLE_ITEM_TYPES) == tuples


def test_configs_are_locked():
    c = cli.load_config_file(MINIWORLD)
    with pytest.raises(AttributeError):
        c.encoder.num_querys = 3


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = cli.main(["train", *args])
    return rc, capsys.readouterr().err


def test_unknown_key_is_one_message_with_the_close_match(capsys, tmp_path):
    rc, err = run_cli(capsys, "--config", MINIWORLD, "--workdir", str(tmp_path),
                      "--config.encoder.num_querys=5")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(
        "error: unknown config key config.encoder.num_querys (in --config.encoder.num_querys=5); "
        "did you mean config.encoder.num_queries")


def test_wrong_type_is_one_message(capsys, tmp_path):
    rc, err = run_cli(capsys, "--config", MINIWORLD, "--workdir", str(tmp_path),
                      "--config.batch_size=many")
    assert rc == 2
    assert err.strip() == "error: --config.batch_size='many': batch_size expects int (current value 32)"


def test_a_tuple_field_given_a_bad_value_names_the_key(capsys, tmp_path):
    rc, err = run_cli(capsys, "--config", MINIWORLD, "--workdir", str(tmp_path),
                      "--config.loss.timestep_range=abc")
    assert rc == 2
    assert err.strip() == ("error: --config.loss.timestep_range='abc': loss.timestep_range expects a "
                           "tuple of float, e.g. --config.loss.timestep_range='(0.5, 1.0)' "
                           "(current value (0.5, 1.0))")
    for good in ("(0.2, 0.9)", "0.2,0.9"):
        cli.validate_command_line(["--config", MINIWORLD, "--workdir", str(tmp_path),
                                   f"--config.loss.timestep_range={good}"])


def test_missing_decoder_folder_is_one_message(capsys, tmp_path):
    rc, err = run_cli(capsys, "--config", MINIWORLD, "--workdir", str(tmp_path / "w"),
                      f"--config.decoder.path={tmp_path / 'nowhere'}")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "decoder folder does not exist" in lines[0], err
    assert "Traceback" not in err


def test_missing_workdir_and_config_file(capsys, tmp_path):
    assert run_cli(capsys, "--config", MINIWORLD)[0] == 2
    rc, err = run_cli(capsys, "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path))
    assert rc == 2 and "config file not found" in err
