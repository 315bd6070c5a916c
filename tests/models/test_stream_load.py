"""The streaming NF4 loader builds exactly the model `from_pretrained` builds with the same BitsAndBytesConfig.

Every packed 4-bit weight and its quant state (absmax, nested double-quant statistics, code, shape, dtype), every
dense parameter and buffer, the config, generation config, the quantizer attributes PEFT reads, and the logits of a
forward, for Llama and Qwen3 checkpoints, single-file and sharded, tied and untied, fp32 and bf16. Plus the errors on a
tensor too many or too few, and a PEFT adapter trained on the streamed base reloading with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raytune_llm.models.load import load_model
from raytune_llm.models.quantize import bnb_config, keep_nf4_layout
from raytune_llm.models.stream_load import StreamUnsupported, load_nf4_streaming
from raytune_llm.models.tiny import build_tiny_model

QUANT_ATTRS = ("is_quantized", "quantization_method", "is_loaded_in_4bit", "is_4bit_serializable")
PARAM4_ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized", "requires_grad")


def _reference(path: Path, dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8, device=None):
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu") if device is None else device
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation="sdpa",
        quantization_config=bnb_config(dtype, quant_storage),
        device_map={"": device.index if device.type == "cuda" else "cpu"},
    )


def _assert_same_tensor(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(a) is type(b), f"{name}: {type(a).__name__} vs {type(b).__name__}"
    assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), (
        f"{name}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
    )
    # Bit for bit: packed 4-bit data in a float storage dtype holds NaN patterns that torch.equal calls unequal.
    bits_a, bits_b = (t.data.contiguous().reshape(-1).view(torch.uint8) for t in (a, b))
    assert torch.equal(bits_a, bits_b), f"{name}: values differ"


def assert_same_model(ref, ours) -> None:
    ref_modules, our_modules = dict(ref.named_modules()), dict(ours.named_modules())
    assert ref_modules.keys() == our_modules.keys()
    for name, module in ref_modules.items():
        assert type(module) is type(our_modules[name]), name
    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert ref_params.keys() == our_params.keys()
    n4 = 0
    for name, a in ref_params.items():
        b = our_params[name]
        _assert_same_tensor(name, a, b)
        assert a.requires_grad == b.requires_grad, name
        if type(a).__name__ == "Params4bit":
            n4 += 1
            for attr in PARAM4_ATTRS:
                assert getattr(a, attr) == getattr(b, attr), f"{name}.{attr}"
            qa, qb = a.quant_state.as_dict(packed=False), b.quant_state.as_dict(packed=False)
            assert qa.keys() == qb.keys(), name
            for key, value in qa.items():
                if torch.is_tensor(value):
                    _assert_same_tensor(f"{name}.quant_state.{key}", value, qb[key])
                else:
                    assert value == qb[key], f"{name}.quant_state.{key}: {value} vs {qb[key]}"
    assert n4 == 7 * ref.config.num_hidden_layers
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()  # bnb adds the packed quant state blobs here
    assert ref_sd.keys() == our_sd.keys()
    for name in ref_sd:
        _assert_same_tensor(name, ref_sd[name], our_sd[name])
    ref_buf, our_buf = dict(ref.named_buffers()), dict(ours.named_buffers())
    assert ref_buf.keys() == our_buf.keys()
    for name in ref_buf:
        _assert_same_tensor(name, ref_buf[name], our_buf[name])
    tied = ref.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == tied
    assert ref.config.to_dict() == ours.config.to_dict()
    assert ref.generation_config.to_dict() == ours.generation_config.to_dict()
    for attr in QUANT_ATTRS:
        assert getattr(ref, attr) == getattr(ours, attr), attr
    assert type(ours.hf_quantizer) is type(ref.hf_quantizer)
    assert sorted(ours.hf_quantizer.modules_to_not_convert) == sorted(ref.hf_quantizer.modules_to_not_convert)
    assert ours.training == ref.training


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "family, dtype, tie, shard",
    [
        ("llama", torch.float32, False, None),
        ("llama", torch.bfloat16, True, "30KB"),
        ("qwen3", torch.float32, True, None),
        ("qwen3", torch.bfloat16, False, "30KB"),
    ],
)
def test_streamed_equals_from_pretrained(tmp_path, family, dtype, tie, shard):
    path = build_tiny_model(
        tmp_path / "m", family=family, tie_word_embeddings=tie, dtype=torch.bfloat16, max_shard_size=shard
    )
    assert len(list(path.glob("*.safetensors"))) > 1 if shard else (path / "model.safetensors").is_file()
    ref = _reference(path, dtype)
    ours = load_nf4_streaming(path, dtype=dtype, device="cpu")
    assert_same_model(ref, ours)
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("family, quant_storage", [("llama", torch.uint8), ("qwen3", torch.bfloat16)])
def test_streamed_equals_from_pretrained_on_cuda(tmp_path, family, quant_storage):
    path = build_tiny_model(
        tmp_path / "m",
        family=family,
        tie_word_embeddings=family == "qwen3",
        dtype=torch.bfloat16,
        max_shard_size="30KB",
    )
    device = torch.device("cuda", torch.cuda.current_device())
    ref = _reference(path, torch.bfloat16, quant_storage, device)
    ours = load_nf4_streaming(path, dtype=torch.bfloat16, device=device, quant_storage=quant_storage)
    assert ours.model.layers[0].mlp.up_proj.weight.device == device
    assert_same_model(ref, ours)
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=0, atol=0)


def test_quant_storage_bf16_equals_from_pretrained(tmp_path):
    path = build_tiny_model(tmp_path / "m", family="llama", max_shard_size="40KB")
    ref = _reference(path, torch.float32, torch.bfloat16)
    ours = load_nf4_streaming(path, dtype=torch.float32, device="cpu", quant_storage=torch.bfloat16)
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert_same_model(ref, ours)
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=0, atol=0)


def test_no_shard_stays_mapped(tmp_path):
    # bf16 on disk and in memory: from_pretrained keeps the dense weights as views into its maps here.
    path = build_tiny_model(tmp_path / "m", family="llama", dtype=torch.bfloat16, max_shard_size="20KB")
    model = load_nf4_streaming(path, dtype=torch.bfloat16, device="cpu")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    assert str(path) not in maps.read_text(), "a shard is still mapped after the load"
    assert model.model.layers[1].self_attn.q_proj.weight.quant_state is not None


def _rewrite_single(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_one_clear_error(tmp_path):
    path = build_tiny_model(tmp_path / "m", family="llama")
    _rewrite_single(path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(
        ValueError, match=r"lacks 1 tensor\(s\) the model needs: model\.layers\.1\.mlp\.down_proj\.weight"
    ):
        load_nf4_streaming(path, dtype=torch.float32)


def test_unexpected_tensor_is_one_clear_error(tmp_path):
    path = build_tiny_model(tmp_path / "m", family="llama")
    _rewrite_single(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_nf4_streaming(path, dtype=torch.float32)


def test_prequantized_checkpoint_falls_back(tmp_path):
    path = build_tiny_model(tmp_path / "m", family="llama")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StreamUnsupported, match="already-quantized"):
        load_nf4_streaming(path, dtype=torch.float32)


def test_adapter_on_streamed_base_reloads_with_peft(tmp_path):
    from peft import PeftModel

    path = build_tiny_model(tmp_path / "m", family="qwen3", max_shard_size="40KB")
    model = load_model(path, quantize="nf4", lora=dict(r=4, alpha=8), dtype=torch.float32, device="cpu", fused=False)
    assert model.base_model.model.is_loaded_in_4bit
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    reference = _reference(path, torch.float32)
    keep_nf4_layout(reference)  # exact NF4 in eval mode, as load_model's (AVX512-BF16 CPUs repack otherwise)
    reloaded = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(model), _logits(reloaded), rtol=0, atol=0)


def test_loaded_nf4_weights_are_never_repacked_for_the_cpu_kernel(tmp_path):
    # bitsandbytes repacks a Linear4bit's weight in place on its first eval-mode, no-grad CPU forward where the CPU
    # has AVX512-BF16 (`support_avx512bf16_for_cpu`); load_model turns that off, so an evaluation pass leaves the
    # exact NF4 weight that training, ZeRO-3 and the merge read. The flag is forced on here to stand for such a CPU.
    import bitsandbytes as bnb

    model = load_model(build_tiny_model(tmp_path / "m"), quantize="nf4", lora=None, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    assert keep_nf4_layout(model) == len(layers)
    before = {id(m): m.weight.detach().clone() for m in layers}
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    for m in layers:
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.detach(), before[id(m)])


@pytest.mark.parametrize("double_quant", [True, False])
def test_double_quant_setting_reaches_the_weights_and_the_merge_reproduces_them(tmp_path, double_quant):
    # quant.double_quant=false used to be written to the adapter's raytune_llm.json while training double-quantized
    # anyway, so the NF4 merge at export rebuilt other weights than the ones trained on.
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from raytune_llm.export import merge

    folder = build_tiny_model(tmp_path / "m")
    model = load_model(folder, quantize="nf4", lora=None, dtype=torch.float32, double_quant=double_quant)
    dense = load_file(str(folder / "model.safetensors"))
    quant = {"quant_bits": 4, "blocksize": 64, "double_quant": double_quant, "compute_dtype": "float32"}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers
    for name, m in layers.items():
        assert bool(m.weight.quant_state.nested) is double_quant
        trained = bnbf.dequantize_4bit(m.weight.data.reshape(-1), m.weight.quant_state).reshape(
            m.weight.quant_state.shape
        )
        assert torch.equal(merge.nf4_roundtrip(dense[f"{name}.weight"], quant), trained)
