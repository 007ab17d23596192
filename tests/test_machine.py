"""Per-machine speed choices: the rule table, forced choices, recorded choices reused on resume."""

from __future__ import annotations

import json

import pytest
import torch

from clipmed import machine
from clipmed.errors import ClipmedError
from clipmed.machine import Choices, Facts, Speed, decide, resolve

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2", "fma"})


def _facts(flags=AVX512_BF16, device="cpu", cuda=None) -> Facts:
    return Facts(device=device, cpu_model="test CPU", cpu_flags=flags, cpu_capability="AVX512", cores=4,
                 cuda_capability=cuda)


def test_amx_cpus_train_the_image_tower_in_fp32_channels_last_and_the_text_tower_in_bf16():
    choices, rule = decide(_facts(AMX))
    assert (choices.image_precision, choices.text_precision, choices.memory_format) == ("fp32", "bf16", "channels_last")
    assert choices.attention == "matmul" and choices.threads == 4 and "amx_bf16" in rule


def test_bf16_without_amx_gets_the_same_tower_precisions_and_no_bf16_at_all_gets_fp32():
    avx512, _ = decide(_facts(AVX512_BF16))
    assert (avx512.image_precision, avx512.text_precision, avx512.memory_format) == ("fp32", "bf16", "channels_last")
    plain, rule = decide(_facts(AVX2))
    assert (plain.image_precision, plain.text_precision) == ("fp32", "fp32") and "without bf16" in rule


def test_gpus_use_bf16_from_ampere_and_fused_attention():
    ampere, _ = decide(_facts(device="cuda", cuda=(8, 0)))
    assert (ampere.image_precision, ampere.text_precision, ampere.attention) == ("bf16", "bf16", "fused")
    turing, _ = decide(_facts(device="cuda", cuda=(7, 5)))
    assert turing.image_precision == turing.text_precision == "fp32"


def test_forced_choices_override_the_rule_and_a_tower_precision_overrides_both():
    choices, decided_by = resolve(Speed(precision="fp32", text_precision="bf16", memory_format="contiguous",
                                        fuse_conv_bn=False, attention="fused", threads=1, compile=True), _facts(AMX))
    assert choices == Choices(image_precision="fp32", text_precision="bf16", memory_format="contiguous",
                              fuse_conv_bn=False, attention="fused", threads=1, compile=True)
    assert "forced" in decided_by
    assert resolve(Speed(), _facts(AMX)) == (decide(_facts(AMX))[0], decide(_facts(AMX))[1])


@pytest.mark.parametrize("speed", [Speed(precision="fp16"), Speed(memory_format="nhwc"), Speed(threads=-1), Speed(threads=10**20)])
def test_bad_choices_are_one_line_errors(speed):
    with pytest.raises(ClipmedError):
        resolve(speed, _facts())


def test_recorded_choices_are_reused_whatever_the_machine_and_the_forced_values():
    recorded = decide(_facts(AMX))[0].to_dict()
    choices, decided_by = resolve(Speed(precision="bf16"), _facts(AVX2), recorded=recorded)
    assert choices.to_dict() == recorded and "recorded" in decided_by
    with pytest.raises(ClipmedError, match="clipmed version"):
        resolve(Speed(), _facts(), recorded={"image_precision": "fp32"})


def test_this_machines_facts_name_its_cpu():
    facts = machine.facts("cpu")
    assert facts.device == "cpu" and facts.cores >= 1
    assert facts.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert json.loads(json.dumps(facts.to_dict()))["cpu_model"] == facts.cpu_model


def test_a_vit_image_tower_runs_in_bf16_where_the_cnn_rule_says_fp32():
    cnn, _ = decide(_facts(AMX), image_tower="conv")
    vit, rule = decide(_facts(AMX), image_tower="transformer")
    assert cnn.image_precision == "fp32" and vit.image_precision == "bf16" and "ViT" in rule
    assert decide(_facts(AVX2), image_tower="transformer")[0].image_precision == "fp32"


def test_a_forced_contiguous_layout_turns_the_fold_off_unless_it_is_forced_too():
    assert not resolve(Speed(memory_format="contiguous"), _facts(AMX))[0].fuse_conv_bn
    assert resolve(Speed(memory_format="contiguous", fuse_conv_bn=True), _facts(AMX))[0].fuse_conv_bn


def test_a_loaded_model_embeds_with_the_rule_tables_layout_and_a_runs_model_keeps_its_own(monkeypatch):
    from helpers import tiny_dual

    from clipmed.evaluation.embed import embed_texts

    monkeypatch.setattr(machine, "facts", lambda device="cpu": _facts(AMX))
    loaded = tiny_dual()
    plain = tiny_dual()
    machine.ready_for_inference(loaded, "cpu")
    rule = decide(_facts(AMX), loaded.image_tower_kind)[0]
    assert loaded.machine_choices == rule and rule.memory_format == "channels_last"
    assert loaded.image_tower._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_image(pixels), plain.eval().encode_image(pixels), atol=1e-5)

    trained = tiny_dual()
    forced = resolve(Speed(memory_format="contiguous"), _facts(AMX))[0]
    machine.apply_to_model(trained, forced)
    embed_texts(trained, ["a chest x-ray"], precision="fp32")
    assert trained.machine_choices == forced
    assert trained.image_tower._conv_stem.weight.is_contiguous()
