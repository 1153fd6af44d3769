"""`python -m bench.unet_profile`: the compiled UNet's op times, attributed to its parts."""

from bench import unet_profile


def test_ops_are_attributed_to_the_parts_their_metadata_names():
    hlo = ('%fusion.1 = f32[2] fusion(%a), metadata={op_name="jit(f)/transpose(jvp(UNet2DConditionModel))/'
           'down_blocks_0/attentions_0/transformer_blocks_0/attn1/while/body/reduce_max"}\n'
           '%conv.2 = f32[2] convolution(%b), metadata={op_name="jit(f)/UNet2DConditionModel/conv_in/conv_general_dilated"}\n'
           '%dot.3 = f32[4,256,8]{2,1,0} dot(%c, %d)\n')
    result = unet_profile.attribute({"fusion.1": 3000.0, "conv.2": 1000.0, "dot.3": 2000.0}, hlo, calls=2)
    assert result["total_ms"] == 3.0
    assert result["parts_ms"] == {"attn1 backward": 1.5, "conv forward": 0.5}
    assert result["ops_ms"][0] == {"part": "attn1", "where": "backward loop", "primitive": "reduce_max", "ms": 1.5}
    assert result["unlabelled_ms"] == [{"op": "dot.3", "ms": 1.0, "hlo": "f32[4,256,8]{2,1,0} dot(%c, %d)"}]


def test_the_tiny_preset_profiles_every_part_of_the_text_gradient(capsys):
    assert unet_profile.main(["--preset", "tiny", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny, batch 2, grad:" in out
    for part in ("attn1 forward", "attn1 backward", "conv forward", "ff forward", "norm backward"):
        assert f"| {part} |" in out
    assert unet_profile.main(["--preset", "sd3"]) == 2
