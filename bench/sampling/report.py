"""The markdown table of a sampling run (OUT/sampling.md), in bench/throughput.py's style."""

from __future__ import annotations

from typing import Any


def _num(x: Any, fmt: str, scale: float = 1.0) -> str:
    return format(x * scale, fmt) if x is not None else "-"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Text -> image sampling throughput ({result['decoder']}, {result['dtype']})", "",
             f"{env['date']}; {env['device_count']} x {env['device_kind']} ({env['platform']}); jax {env['jax']}; "
             f"{result['image_size']} px, DDIM {result['ddim_steps']} steps, eta 0, classifier-free guidance "
             f"{result['guidance_scale']} (the UNet runs on the prompts and the empty prompt).",
             f"Command: `{result['command']}`", "",
             "Ours (text encoder + DDIM + VAE decode, one jitted program; median of the timed batches):", "",
             "| batch/dev | global batch | ms/batch | img/s | img/s/dev | compile s | first batch s | "
             "XLA temp GiB | peak GiB |", "|" + "---|" * 9]
    for r in result["runs"]:
        head = f"| {r['batch_per_device']} |"
        if "batch_ms" not in r:
            lines.append(head + f" {r.get('error') or r.get('skipped')} |" + " |" * 7)
            continue
        cells = [str(r["global_batch"]), _num(r["batch_ms"], ".1f"), _num(r["images_per_s"], ".3g"),
                 _num(r["images_per_s_per_device"], ".3g"), _num(r["compile_s"], ".1f"),
                 _num(r["first_batch_s"], ".2f"), _num(r["xla_temp_bytes"], ".3g", 2**-30),
                 _num(r["peak_bytes_in_use"], ".3g", 2**-30)]
        lines.append(head + " " + " | ".join(cells) + " |")
    if "torch" in result:
        lines += ["", "diffusers' StableDiffusionPipeline, same weights, prompt ids and initial noise, one device "
                  "(ours/torch: our images/s per device over torch's; parity: max |ours - torch| of the images "
                  "in [0, 1], float32 only):", "",
                  "| batch | device | dtype | ms/batch | img/s | peak GiB | ours/torch | parity (max abs, uint8) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["torch"]:
            if "batch_ms" not in r:
                lines.append(f"| {r.get('batch', '-')} | {r.get('error') or r.get('skipped')} | | | | | | |")
                continue
            p = r.get("parity")
            par = f"{p['max_abs_diff']:.1e}, {p['uint8_max_diff']}" if p else "not checked (bf16)"
            lines.append(f"| {r['batch']} | {r['device']} | {r['dtype']} | {r['batch_ms']:.1f} | "
                         f"{r['images_per_s']:.3g} | {_num(r['peak_bytes'], '.3g', 2**-30)} | "
                         f"{_num(r.get('ours_over_torch_images_per_s'), '.2f')} | {par} |")
    lines += ["", f"Params: {result['params']}; total {result['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
