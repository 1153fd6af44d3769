"""`python -m bench.unet_ab`: variants of our UNet's program, compiled side by side and timed in turn."""

import json

import pytest

from bench import unet_ab
from dediffusion_jax.t2i import attention


def test_variants_time_in_turn_and_compute_the_same_unet(tmp_path):
    variants = "default,attention:plain,loop-above:0,xla:xla_cpu_enable_fast_math=false,flipped-kernels"
    # batch 16 over the test session's 8 CPU devices: 2 examples a device, so the attention can loop
    assert unet_ab.main(["--preset", "tiny", "--batch", "16", "--variants", variants, "--rounds", "1",
                         "--calls", "1", "--rusage", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "unet_ab.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == variants.split(",")
    # each variant is its own program: tiny logits stay under the default threshold, `loop-above:0`
    # loops every attention (forward and backward)
    assert [r["loops_in_gradient"] for r in rows] == [0, 0, rows[2]["loops_in_gradient"], 0, 0]
    assert rows[2]["loops_in_gradient"] >= 2
    for row in rows:
        assert row["forward_ms"] > 0 and row["text_grad_ms"] > 0
        assert row["max_abs_diff"] < 1e-5  # the same UNet whatever the variant
        assert row["user_ms_per_call"] > 0 and row["minor_faults_per_call"] >= 0
    assert rows[0]["max_abs_diff"] == 0.0
    assert "| tiny | 16 | 8 | `attention:plain` |" in (tmp_path / "unet_ab.md").read_text()


def test_gradient_only_times_the_gradient_back_to_back_and_records_the_allocator(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "")
    assert unet_ab.main(["--preset", "tiny", "--variants", "flipped-kernels", "--rounds", "1", "--calls", "2",
                         "--gradient-only", "--rusage", "--out", str(tmp_path)]) == 0
    row, = json.loads((tmp_path / "unet_ab.json").read_text())["rows"]
    assert row["forward_ms"] == "-" and row["text_grad_ms"] > 0 and row["user_ms_per_call"] > 0
    assert "LD_PRELOAD ''" in (tmp_path / "unet_ab.md").read_text()


def test_a_variant_changes_the_attention_only_while_it_is_traced(monkeypatch):
    monkeypatch.delenv("DEDIFFUSION_ATTENTION", raising=False)
    before = attention.LOOP_ABOVE_BYTES
    with unet_ab.applied("loop-above:123") as options:
        assert attention.LOOP_ABOVE_BYTES == 123 and options == {}
    with unet_ab.applied("attention:plain"):
        assert attention._choose(None, 1 << 40, 1, 32) == "plain"
    with unet_ab.applied("xla:xla_cpu_enable_fast_math=true") as options:
        assert options == {"xla_cpu_enable_fast_math": True}
    assert attention.LOOP_ABOVE_BYTES == before
    assert "DEDIFFUSION_ATTENTION" not in __import__("os").environ


@pytest.mark.parametrize("variants, message", [
    ("fast", "variant 'fast': expected one of default, xla, attention, loop-above, flipped-kernels"),
    ("attention:flash", "expected attention:plain or attention:loop"),
    ("loop-above:big", "expected loop-above:BYTES"),
    ("xla:xla_cpu_enable_fast_math", "expected xla:OPTION=VALUE"),
    ("default,default", "give each variant once"),
    ("flipped-kernels:yes", "flipped-kernels takes no value"),
])
def test_an_unknown_variant_is_one_error_line(variants, message, capsys):
    assert unet_ab.main(["--preset", "tiny", "--variants", variants]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_an_option_this_xla_lacks_is_one_error_line(capsys):
    assert unet_ab.main(["--preset", "tiny", "--variants", "xla:xla_cpu_no_such_option=1",
                         "--rounds", "1", "--calls", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "xla_cpu_no_such_option" in err
