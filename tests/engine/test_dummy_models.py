"""Named random-weight models of real checkpoints' shapes (model_config.DUMMY_MODELS), for benchmarks."""

from parrot_lc.engine.loader import load_model_info, resolve_checkpoint


def test_llama3_8b_dummy_has_llama3_8b_shapes_random_weights_and_the_tiny_tokenizer(tmp_path):
    config, tokenizer = load_model_info("llama3-8b-dummy", tmp_path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (32, 32, 8, 128)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (4096, 14336, 128256)
    assert tokenizer is not None and tokenizer.decode(tokenizer.encode("fork")).endswith("fork")
    assert resolve_checkpoint("llama3-8b-dummy", tmp_path) == (tmp_path / "llama3-8b-dummy", True)
