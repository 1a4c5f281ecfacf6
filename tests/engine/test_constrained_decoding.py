"""Constrained decoding (engine/constraints.py): a request with a constraint generates only what its grammar allows
(JSON schemas, any JSON object, regular expressions, choices), greedy or sampled, batched beside unconstrained
requests that it leaves unchanged, through preemption and overlapped steps; a bad constraint is refused at
submission. The tiny model's weights are random: near-uniform logits, the hardest case for a grammar's mask."""

import json
import re
import shutil

import jsonschema
from conftest import generate_from_all
import pytest
import torch

from parrot_lc.engine import Constraint, InvalidRequestError, SamplingParams
from parrot_lc.engine.constraints import ConstraintCompiler, TokenMasks, apply_token_masks, token_masks
from parrot_lc.engine.loader import TINY_DIR
from parrot_lc.engine.sampling import Sampler

SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99},
            "admin": {"type": "boolean"}}, "required": ["id", "admin"]}},
        "required": ["user"],
    },
    "enums": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "level": {"enum": [1, 2, 3]}},
        "required": ["unit", "level"],
    },
    "arrays": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "required and optional fields": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 4}, "ok": {"type": "boolean"},
                       "note": {"type": "null"}},
        "required": ["name", "ok"],
    },
}
SEEDS = (0, 1, 2)
PROMPT = list(range(3, 20))


def outputs(engine, requests) -> list[tuple[list[int], str, str]]:
    """Each request's tokens, text and finish reason, in order."""
    events = engine.run_until_done(requests)
    return [([t for e in events[r.request_id] for t in e.token_ids], "".join(e.text for e in events[r.request_id]),
             events[r.request_id][-1].finish_reason) for r in requests]


def submit(engine, name, max_tokens=200, constraint=None, **sampling):
    params = SamplingParams(max_tokens=max_tokens, constraint=constraint, **sampling)
    return engine.submit_generate(params, name, token_ids=PROMPT)


def test_json_schema_outputs_are_valid_at_temperature_one(tiny):
    cases = [(schema, seed) for schema in SCHEMAS.values() for seed in SEEDS]
    requests = [submit(tiny, f"r{i}", constraint=Constraint("json_schema", json.dumps(schema)), temperature=1.0,
                       seed=seed) for i, (schema, seed) in enumerate(cases)]
    for (schema, _), (_, text, reason) in zip(cases, outputs(tiny, requests)):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_a_strict_schema_allows_no_properties_it_does_not_name(tiny):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    requests = [submit(tiny, f"r{seed}", constraint=Constraint("json_schema", json.dumps(schema)), seed=seed)
                for seed in SEEDS]
    assert all(set(json.loads(text)) == {"ok"} for _, text, _ in outputs(tiny, requests))


def test_json_object_outputs_are_objects_or_cut_prefixes_of_one(tiny):
    constraint = Constraint("json_object")
    requests = [submit(tiny, f"r{seed}", max_tokens=60, constraint=constraint, seed=seed) for seed in range(8)]
    results = outputs(tiny, requests)
    any_value = ConstraintCompiler(tiny.tokenizer, tiny.config.vocab_size, tiny.eos_token_ids)
    for tokens, text, reason in results:
        assert text.lstrip().startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens, with every token one that a JSON value could go on with
            assert reason == "length"
            any_value.start(Constraint("json_schema", "{}"), tuple(tokens))  # raises if the JSON went wrong
    assert any(reason == "stop" for _, _, reason in results)  # with random weights, few end within 60 tokens


def test_regex_outputs_match_the_whole_pattern(tiny):
    pattern = r"[a-z]{3}-\d{2}( ok)?"
    requests = [submit(tiny, f"r{seed}", constraint=Constraint("regex", pattern), seed=seed, top_p=0.9, top_k=50)
                for seed in SEEDS]
    for _, text, reason in outputs(tiny, requests):
        assert reason == "stop" and re.fullmatch(pattern, text), text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_outputs_are_one_of_the_choices(tiny, temperature):
    choices = ["red", "green", "blue", 'say "hi"\n']
    requests = [submit(tiny, f"r{seed}", constraint=Constraint("choice", json.dumps(choices)),
                       temperature=temperature, seed=seed) for seed in SEEDS]
    assert all(text in choices and reason == "stop" for _, text, reason in outputs(tiny, requests))


def test_a_complete_grammar_ends_the_request_even_when_told_to_ignore_eos(tiny):
    request = submit(tiny, "r", constraint=Constraint("choice", '["yes"]'), temperature=0.0, ignore_eos=True)
    [(tokens, text, reason)] = outputs(tiny, [request])
    assert (text, reason) == ("yes", "stop") and tokens[-1] in tiny.eos_token_ids


def test_max_tokens_still_cuts_a_constrained_output(tiny):
    request = submit(tiny, "r", max_tokens=3, constraint=Constraint("regex", "[a-z]{40}"), seed=0)
    [(tokens, _, reason)] = outputs(tiny, [request])
    assert reason == "length" and len(tokens) == 3


def test_unconstrained_rows_sample_the_same_tokens_beside_constrained_rows(tiny):
    plain = [dict(temperature=1.0, seed=5), dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=6)]
    alone = outputs(tiny, [submit(tiny, f"alone{i}", max_tokens=12, ignore_eos=True, **s) for i, s in enumerate(plain)])
    constraint = Constraint("json_schema", json.dumps(SCHEMAS["enums"]))
    mixed = []
    for i, s in enumerate(plain):
        mixed.append(submit(tiny, f"mixed{i}", max_tokens=12, ignore_eos=True, **s))
        mixed.append(submit(tiny, f"constrained{i}", max_tokens=12, constraint=constraint, seed=i))
    assert outputs(tiny, mixed)[::2] == alone


def test_overlapped_steps_generate_the_same_constrained_outputs(make_engine):
    """With overlap, a step that samples a constrained row reads the step before back first (its grammar must
    take that token before its next mask): what is generated is what steps one at a time generate."""
    def run(engine):
        constraint = Constraint("regex", r"[a-z]{2,6}( [a-z]{2,6}){0,3}\.")
        requests = [submit(engine, f"c{seed}", constraint=constraint, seed=seed) for seed in SEEDS]
        requests += [submit(engine, f"p{seed}", max_tokens=10, temperature=1.0, seed=seed) for seed in SEEDS]
        return outputs(engine, requests)

    overlapped = run(make_engine(overlap_steps=True))
    assert overlapped == run(make_engine(overlap_steps=False))
    assert all(reason == "stop" for _, _, reason in overlapped[:len(SEEDS)])


def test_preempted_constrained_requests_finish_valid_and_unchanged(make_engine):
    pattern = r"[a-z ]{10,16}\."
    prompts = [list(range(3 + i, 3 + i + 30)) for i in range(6)]
    sampling = SamplingParams(max_tokens=20, temperature=0.0, constraint=Constraint("regex", pattern))
    roomy = generate_from_all(make_engine(), prompts, sampling)
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers * (k, v) * block * kv heads * head dim * float32
    engine = make_engine(kv_cache_bytes=12 * block_bytes)  # 6 contexts of up to 50 tokens need up to 24
    assert generate_from_all(engine, prompts, sampling) == roomy
    assert engine.stats().num_preemptions > 0
    assert all(re.fullmatch(pattern, engine.tokenizer.decode(tokens, skip_special_tokens=True))
               for tokens in roomy.values())


def test_a_resumed_output_goes_on_in_its_grammar_after_the_tokens_before(tiny):
    """A call resumed on another engine (or after a wait for memory) asks for the rest of its output: its grammar
    takes the tokens generated before first."""
    pattern = r"[a-z]{3}-[0-9]{2}"
    before = tiny.tokenizer("ab", add_special_tokens=False).input_ids
    sampling = [SamplingParams(max_tokens=20, seed=seed, constraint=Constraint("regex", pattern),
                               constraint_prefix=tuple(before)) for seed in SEEDS]
    requests = [tiny.submit_generate(s, f"r{i}", token_ids=PROMPT + before) for i, s in enumerate(sampling)]
    for _, text, reason in outputs(tiny, requests):
        assert reason == "stop" and re.fullmatch(pattern, "ab" + text), text


def test_tokens_before_that_break_the_grammar_are_refused(tiny):
    before = tuple(tiny.tokenizer("12", add_special_tokens=False).input_ids)
    with pytest.raises(InvalidRequestError, match="^sampling.constraint .*does not match"):
        tiny.submit_generate(SamplingParams(constraint=Constraint("regex", "[a-z]+"), constraint_prefix=before),
                             "bad", token_ids=PROMPT)


def test_logits_wider_than_the_tokenizer_never_sample_a_padding_token(make_engine, tmp_path):
    model = tmp_path / "padded"
    shutil.copytree(TINY_DIR, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 1024 + 96}))
    engine = make_engine(model=str(model), load_format="dummy")
    plain = outputs(engine, [submit(engine, "plain", max_tokens=60, temperature=1.0, seed=0, ignore_eos=True)])
    assert max(plain[0][0]) >= 1024  # unconstrained, random weights sample the padding too
    requests = [submit(engine, f"r{seed}", max_tokens=60, constraint=Constraint("regex", "[a-z]{20,40}"), seed=seed)
                for seed in SEEDS]
    for tokens, text, _ in outputs(engine, requests):
        assert max(tokens) < 1024 and re.fullmatch("[a-z]{20,40}", text)


@pytest.mark.parametrize("constraint, why", [
    (Constraint("json_schema", "{not json"), "not JSON"),
    (Constraint("json_schema", '{"type": "objekt"}'), "objekt"),
    (Constraint("json_schema", "[1, 2]"), "JSON object"),
    (Constraint("regex", "(unclosed"), "not closed"),
    (Constraint("choice", '"red"'), "list"),
    (Constraint("choice", "[]"), "list"),
    (Constraint("grammar", "root ::= 'a'"), "kind"),
])
def test_a_bad_constraint_is_refused_at_submission_naming_the_field(tiny, constraint, why):
    with pytest.raises(InvalidRequestError, match=f"^sampling.constraint .*{why}"):
        submit(tiny, "bad", constraint=constraint)
    assert "bad" not in tiny.tree and not tiny.has_work()


def test_the_sampler_masks_greedy_and_sampled_rows_alike():
    """Rows 0 and 2 may take only tokens 3 and 7; rows 1 and 3 are not masked."""
    logits = torch.randn(4, 100)  # (B, V)
    allowed = torch.zeros(4, 4, dtype=torch.int32)  # (B, ceil(V / 32))
    allowed[[0, 2], 0] = (1 << 3) | (1 << 7)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=1)]
    sampler = Sampler()
    for _ in range(20):
        tokens = sampler.sample(logits.clone(), params, [sampler.generator(9), None, sampler.generator(1), None],
                                TokenMasks(allowed, torch.tensor([0, 2], dtype=torch.int32))).tolist()
        assert tokens[0] in (3, 7) and tokens[2] in (3, 7)
        assert tokens[1] == logits[1].argmax().item()


@pytest.mark.parametrize("batch", [1, 64], ids=["batch-1", "batch-64"])
def test_masks_filled_for_many_rows_leave_the_other_rows_as_they_were(tiny, batch):
    compiler = ConstraintCompiler(tiny.tokenizer, tiny.config.vocab_size, tiny.eos_token_ids)
    states = [compiler.start(Constraint("choice", '["red"]')) if row % 2 == 0 else None for row in range(batch)]
    logits = torch.randn(batch, tiny.config.vocab_size)  # (B, V)
    masked = logits.clone()
    apply_token_masks(masked, token_masks(states, tiny.config.vocab_size, torch.device("cpu")))
    starts = {t for t in range(tiny.config.vocab_size) if "red".startswith(tiny.tokenizer.decode([t]) or "-")}
    for row in range(batch):
        kept = set(torch.where(masked[row].isfinite())[0].tolist())
        assert kept == (set(range(tiny.config.vocab_size)) if row % 2 else starts)
        assert torch.equal(masked[row, list(kept)], logits[row, list(kept)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run through the device tool)")
@pytest.mark.parametrize("batch", [1, 64], ids=["batch-1", "batch-64"])
def test_masks_applied_on_the_gpu_hold_greedy_and_sampled_rows(tiny, batch):
    compiler = ConstraintCompiler(tiny.tokenizer, tiny.config.vocab_size, tiny.eos_token_ids)
    choices = ["red", "green"]
    starts = {t for t in range(tiny.config.vocab_size)
              if any(c.startswith(tiny.tokenizer.decode([t]) or "-") for c in choices)}
    constrained = [row % 3 != 0 for row in range(batch)]
    states = [compiler.start(Constraint("choice", json.dumps(choices))) if c else None for c in constrained]
    device = torch.device("cuda")
    logits = torch.randn(batch, tiny.config.vocab_size, device=device)  # (B, V)
    masks = token_masks(states, tiny.config.vocab_size, device)
    params = [SamplingParams(temperature=float(row % 2), seed=row) for row in range(batch)]
    sampler = Sampler(device=device)
    tokens = sampler.sample(logits.clone(), params, [sampler.generator(row) for row in range(batch)], masks).tolist()
    for row, token in enumerate(tokens):
        if constrained[row]:
            assert token in starts
        elif params[row].greedy:
            assert token == logits[row].argmax().item()
