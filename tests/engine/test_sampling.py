"""Sampling: greedy, temperature, top-k, top-p, seeds, and every way a generation stops."""

import dataclasses

import torch

from parrot_lc.engine import SamplingParams
from parrot_lc.engine.sampling import Sampler, TokenHistory, apply_penalties


def generated(engine, sampling, parent="p"):
    events = list(engine.generate(sampling, object(), parent))
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason


def test_the_same_seed_gives_the_same_tokens(tiny):
    tiny.fill(list(range(3, 30)), "p")
    sampling = SamplingParams(max_tokens=16, temperature=1.5, seed=1234, ignore_eos=True)
    first, second = generated(tiny, sampling)[0], generated(tiny, sampling)[0]
    other = generated(tiny, SamplingParams(max_tokens=16, temperature=1.5, seed=99, ignore_eos=True))[0]
    assert first == second and first != other


def test_a_seeded_request_samples_the_same_alone_and_in_a_batch(tiny):
    tiny.fill(list(range(3, 30)), "p")
    sampling = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = generated(tiny, sampling)[0]
    requests = [tiny.submit_generate(SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True),
                                     f"g{s}", "p") for s in (1, 7, 3)]
    events = tiny.run_until_done(requests)
    assert [t for e in events[requests[1].request_id] for t in e.token_ids] == alone


def test_top_k_of_one_and_a_tiny_top_p_are_greedy(tiny):
    tiny.fill(list(range(3, 30)), "p")
    greedy = generated(tiny, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert generated(tiny, SamplingParams(max_tokens=10, top_k=1, seed=3, ignore_eos=True))[0] == greedy
    assert generated(tiny, SamplingParams(max_tokens=10, top_p=1e-6, seed=3, ignore_eos=True))[0] == greedy


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    probs = Sampler._probabilities(logits, [SamplingParams(top_k=2)])
    assert probs[0, 0] == 0 and probs[0, 3] == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = Sampler._probabilities(logits, [SamplingParams(top_p=0.7)])
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([[2.0, 0.0]])
    cold = Sampler._probabilities(logits, [SamplingParams(temperature=0.5)])
    hot = Sampler._probabilities(logits, [SamplingParams(temperature=2.0)])
    assert cold[0, 0] > hot[0, 0] > 0.5


def test_sampled_tokens_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20_000, 4)  # (N, V)
    params = [SamplingParams(temperature=1.0)] * len(logits)
    tokens = Sampler(seed=0).sample(logits, params, [None] * len(logits))
    frequencies = torch.bincount(tokens, minlength=4) / len(logits)
    assert torch.allclose(frequencies, probs, atol=0.015), frequencies


def test_a_seeded_row_draws_from_its_own_generator():
    sampler = Sampler(seed=0)
    logits = torch.zeros(2, 1000)  # (2, V): every token equally likely
    params = [SamplingParams(temperature=1.0, seed=5)] * 2
    first = sampler.sample(logits, params, [sampler.generator(5), sampler.generator(6)])
    again = sampler.sample(logits, params, [sampler.generator(5), None])
    assert first[0] == again[0] and first[0] != first[1]


def test_generation_stops_at_max_tokens(tiny):
    tiny.fill(list(range(3, 30)), "p")
    tokens, _, reason = generated(tiny, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    assert len(tokens) == 7 and reason == "length"


def test_generation_stops_at_a_stop_token_id(tiny):
    tiny.fill(list(range(3, 30)), "p")
    free_run = generated(tiny, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    tokens, _, reason = generated(tiny, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(free_run[2],)))
    assert tokens == free_run[: free_run.index(free_run[2]) + 1] and reason == "stop"


def test_generation_stops_at_eos_unless_told_to_ignore_it(tiny):
    tiny.fill(list(range(3, 30)), "p")
    free_run = generated(tiny, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    tiny.eos_token_ids = (free_run[1],)
    tokens, _, reason = generated(tiny, SamplingParams(max_tokens=8, temperature=0.0))
    assert tokens == free_run[: free_run.index(free_run[1]) + 1] and reason == "stop"


def test_stop_strings_end_generation_and_are_cut_from_the_text(tiny):
    tiny.fill(tiny.tokenizer("def main(self): return").input_ids, "p")
    _, text, _ = generated(tiny, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    stop = text[3:6]
    assert stop
    _, cut_text, reason = generated(tiny, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)))
    assert cut_text == text[: text.index(stop)] and reason == "stop"


def test_the_token_that_stops_generation_is_left_out_of_the_text(tiny):
    tiny.fill(list(range(3, 30)), "p")
    free_run = generated(tiny, SamplingParams(max_tokens=8, seed=1, ignore_eos=True))[0]
    tokens, text, _ = generated(tiny, SamplingParams(max_tokens=8, seed=1, stop_token_ids=(free_run[2],)))
    assert tokens == free_run[: free_run.index(free_run[2]) + 1]
    assert tiny.tokenizer.decode(tokens[-1:], skip_special_tokens=True)  # the stop token has text to leave out
    assert text == tiny.tokenizer.decode(tokens[:-1], skip_special_tokens=True)


def test_min_tokens_bans_eos_and_stop_token_ids_until_that_many_tokens(tiny):
    tiny.fill(list(range(3, 30)), "p")
    free_run = generated(tiny, SamplingParams(max_tokens=8, seed=1, ignore_eos=True))[0]
    tiny.eos_token_ids = (free_run[0],)
    sampling = SamplingParams(max_tokens=8, seed=1, stop_token_ids=(free_run[1],))
    assert generated(tiny, sampling)[0] == free_run[:1]
    tokens = generated(tiny, dataclasses.replace(sampling, min_tokens=5))[0]
    assert len(tokens) > 5 and not {free_run[0], free_run[1]} & set(tokens[:5])


def test_stop_strings_count_only_after_min_tokens(tiny):
    tiny.fill(tiny.tokenizer("def main(self): return").input_ids, "p")
    _, text, _ = generated(tiny, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    sampling = SamplingParams(max_tokens=12, temperature=0.0, stop=(text[3:6],), ignore_eos=True, min_tokens=12)
    assert generated(tiny, sampling)[1:] == (text, "length")


def test_streamed_text_deltas_join_to_the_full_text(tiny):
    tiny.fill(tiny.tokenizer("import os").input_ids, "p")
    tokens, text, _ = generated(tiny, SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True))
    assert text == tiny.tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_temperature_too_small_to_divide_by_is_greedy(tiny):
    tiny.fill(list(range(3, 30)), "p")
    greedy = generated(tiny, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert generated(tiny, SamplingParams(max_tokens=8, temperature=1e-120, seed=1, ignore_eos=True))[0] == greedy


def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token(tiny):
    tiny.fill(list(range(3, 30)), "p")
    greedy = generated(tiny, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert generated(tiny, SamplingParams(max_tokens=8, top_p=5e-324, seed=1, ignore_eos=True))[0] == greedy


def penalized_reference(logits: torch.Tensor, seen: list[int], output: list[int], params: SamplingParams):
    """vLLM's penalties in float64, token by token: repetition on the prompt's and output's tokens, then presence
    and frequency on the output's."""
    result = logits.double().clone()
    for token in set(seen):
        value = result[token]
        result[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token in set(output):
        result[token] -= params.presence_penalty + params.frequency_penalty * output.count(token)
    return result


def test_penalties_change_the_logits_of_the_tokens_so_far_as_vllm_does():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # (B, V)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(),
              SamplingParams(presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=0.8)]
    histories = [TokenHistory([1, 2, 3, 2], [3, 2]), None, TokenHistory([4, 5, 6, 6, 6, 7], [6, 6, 7])]
    expected = [penalized_reference(logits[0], [1, 2, 3, 2], [3, 2], params[0]), logits[1].double(),
                penalized_reference(logits[2], [4, 5, 6, 6, 6, 7], [6, 6, 7], params[2])]
    apply_penalties(logits, params, histories)
    assert torch.allclose(logits.double(), torch.stack(expected), atol=1e-6)


def test_min_p_drops_tokens_less_likely_than_its_share_of_the_most_likely():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = Sampler._probabilities(logits, [SamplingParams(min_p=0.5)])
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


# A prompt after which the random model repeats itself (415, 47 twice in its first six greedy tokens), so that the
# penalties change what it generates.
REPEATING = [5, 9, 9, 14, 3, 9, 22, 14, 356, 212, 10, 260, 238, 99, 96, 480, 415, 47, 312, 331]


def test_greedy_generation_with_a_repetition_penalty_is_transformers_own(hf_checkpoint, make_engine):
    path, hf_model = hf_checkpoint("llama")
    engine = make_engine(model=str(path), block_size=8)
    prompt = REPEATING
    engine.fill(prompt, "p")
    unpenalized = generated(engine, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    ours = generated(engine, SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.5,
                                            ignore_eos=True))[0]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   repetition_penalty=1.5, min_new_tokens=12, pad_token_id=0)[0, len(prompt):]
    assert ours == theirs.tolist() and ours != unpenalized


def test_greedy_generation_with_presence_and_frequency_penalties_follows_the_reference(hf_checkpoint, make_engine):
    path, hf_model = hf_checkpoint("llama")
    engine = make_engine(model=str(path), block_size=8)
    prompt = REPEATING
    params = SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=0.6, frequency_penalty=1.1,
                            ignore_eos=True)
    engine.fill(prompt, "p")
    unpenalized = generated(engine, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    ours = generated(engine, params)[0]
    tokens, output = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            logits = hf_model(torch.tensor([tokens])).logits[0, -1]
            output.append(int(penalized_reference(logits, tokens, output, params).argmax()))
            tokens.append(output[-1])
    assert ours == output and ours != unpenalized


def test_a_penalized_request_gives_the_same_tokens_with_overlapped_steps(hf_checkpoint, make_engine):
    path, _ = hf_checkpoint("llama")
    params = SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=1.5, repetition_penalty=1.2,
                            ignore_eos=True)
    outputs = []
    for overlap in (False, True):
        engine = make_engine(model=str(path), block_size=8, overlap_steps=overlap)
        engine.fill(REPEATING, "p")
        requests = [engine.submit_generate(params, "g1", "p"),
                    engine.submit_generate(SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), "g2", "p")]
        events = engine.run_until_done(requests)
        outputs.append([[t for e in events[r.request_id] for t in e.token_ids] for r in requests])
    penalized, unpenalized = outputs[0]
    assert outputs[0] == outputs[1] and penalized != unpenalized

