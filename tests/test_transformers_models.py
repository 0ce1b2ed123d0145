"""Real models nobody here wrote: transformers' decoder families through the default Backend. Every fusion that
applies does, every refusal is explained, and the logits are bit-identical to eager in float32 and bfloat16."""
import pytest
import torch

from pattern_helpers import compile_and_capture

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

LAYERS = 2
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
LLAMA_LIKE = {"add_rms_norm": 2 * LAYERS, "rms_norm": 1, "rotary_embedding": 2 * LAYERS, "silu_and_mul": LAYERS}

# name -> (config class, model class, config overrides, expected matches per dtype, expected near-miss reason)
MODELS = {
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, LLAMA_LIKE, None),
    "Mistral": ("MistralConfig", "MistralForCausalLM", {}, LLAMA_LIKE, None),
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", {}, LLAMA_LIKE, None),  # fused gate_up, split by chunk
    # q and k RMSNorms per layer on top of the Llama layout
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, {**LLAMA_LIKE, "rms_norm": 1 + 2 * LAYERS}, None),
    # x * (1 + w) is not RMSNorm's weight; GeGLU is not SiLU: RoPE alone
    "Gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, {"rotary_embedding": 2 * LAYERS},
              "the weight is computed"),
    # LayerNorm and GELU; RoPE on a quarter of each head (the rotated slice is matched)
    "GPTNeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.25, "num_key_value_heads": None},
                {"rotary_embedding": 2 * LAYERS}, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_decoder_fuses_and_is_bit_identical(name, dtype):
    config_cls, model_cls, overrides, expected, near_reason = MODELS[name]
    kwargs = {**COMMON, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).to(dtype).eval()
    ids = torch.randint(0, 128, (2, 7))
    out, backend, _, after = compile_and_capture(model, (ids,))
    assert backend.report.matches == expected
    for op, n in expected.items():
        assert after[f"fxp.{op}"] == n
    if near_reason is None:
        assert backend.report.near_misses == []
    else:
        assert backend.report.near_misses and all(near_reason in n.reason for n in backend.report.near_misses)
    with torch.no_grad():
        assert torch.equal(out.logits, model(ids).logits)
