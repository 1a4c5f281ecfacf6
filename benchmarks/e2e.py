"""End-to-end workloads of the Parrot paper: parrot_lc against request-level serving on the same engine.

Two server modes over the same engine, model and GPU, each a `parrot-lc serve` process of its own with its engine
in a process of its own (`--engine-processes`; so that each mode gets the whole GPU, and the clients here share no
interpreter with the server, as in a deployment): **parrot** (`app_centric=True`: graphs of Semantic Variables submitted at once, shared prompt prefixes
filled once and forked, priorities from the deduced objectives) and **baseline** (`app_centric=False`:
request-level serving, as LangChain against an OpenAI-compatible server: each LLM call sent on its own as the
application reaches it, no prefix sharing, first come first served; the engine's continuous batching stays on).
Calls of one stage that do not depend on each other are sent concurrently by the baseline too, which is the
most it could do. Output lengths are fixed (`ignore_eos`), so both modes generate the same number of tokens.
The baseline comes in three kinds (`MODES`): without prefix caching, and with it as vLLM has it (`baseline_vllm`)
or with our shared-prefix kernel for every group of requests that share cached blocks (`baseline_apc`).

Model: Llama-2-7B shapes with random bf16 weights (`load_format=dummy`) and the tiny model's byte-level
tokenizer (its 1,024-token vocabulary replaces Llama's 32,000: 0.25 GB fewer lm_head/embedding weights).

    python benchmarks/e2e.py --kv-cache-gib 48 --hf --out benchmarks/results/e2e.json   # the GPU run (+ e2e.png)
    python benchmarks/e2e.py --model tiny --device cpu --scale smoke --hf --out /tmp/e2e.json   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine_decode import LLAMA2_7B as ENGINE_LLAMA2_7B
from parrot_lc.engine.loader import load_model_info
from served import ServeProcess
from workloads import (
    APP_WORKLOADS,
    CHAIN_INSTRUCTION,
    MAP_INSTRUCTION,
    REDUCE_INSTRUCTION,
    REPEATABLE,
    SCALES,
    TARGETS,
    WORKLOADS,
    Driver,
    Scale,
    Text,
)

TINY = Path(__file__).resolve().parent.parent / "parrot_lc" / "engine" / "tiny"
# Llama-2-7B's shapes with the tiny model's tokenizer (its vocabulary and special ids), and room for the
# workloads' longest prompts.
LLAMA2_7B = {**ENGINE_LLAMA2_7B, "vocab_size": 1024, "max_position_embeddings": 16384, "bos_token_id": 0}



def model_dir(args: argparse.Namespace, work: Path) -> str:
    if args.model != "llama2-7b-dummy":
        return args.model
    for path in TINY.iterdir():
        if path.name != "config.json":
            shutil.copy(path, work / path.name)
    (work / "config.json").write_text(json.dumps(LLAMA2_7B))
    return str(work)


# A server mode: whether it serves applications (graphs, prefix sharing, objectives), whether it caches prefixes by
# content (what vLLM and SGLang do for every request by default), and which sequences of a step read a shared
# prefix's KV once (`--shared-prefix-attention`). `baseline_vllm` is request-level serving as a vLLM user runs it
# today: cached blocks reused across requests, a prefix read once only where the whole batch shares it (vLLM's
# cascade attention); `baseline_apc` the same with our shared-prefix kernel for every group of requests that share
# blocks, so that the two separate what the kernel gives from what knowing the application gives; `baseline`,
# without prefix caching, the baseline of the earlier runs.
def _langchain_driver() -> type[Driver]:
    from langchain_workloads import LangChainDriver  # LangGraph is imported only by the runs that use it

    return LangChainDriver


# How the workloads are written (`--client`): the Driver class that runs them.
CLIENTS = {"frontend": lambda: Driver, "langchain": _langchain_driver}

MODES = {"parrot": (True, True, "groups"), "baseline": (False, False, "groups"),
         "baseline_apc": (False, True, "groups"), "baseline_vllm": (False, True, "whole_batch")}


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Starts a server in one mode and runs every workload against it (in this process)."""
    scale = SCALES[args.scale]
    parrot, prefix_caching, shared_prefix_attention = MODES[mode]
    client = CLIENTS[args.client]()
    with tempfile.TemporaryDirectory() as work:
        model = model_dir(args, Path(work))
        flags = ["--model", model, "--device", args.device, "--app-centric", str(parrot),
                 "--prefix-caching", str(prefix_caching), "--shared-prefix-attention", shared_prefix_attention,
                 "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--engine-processes", "true"]
        if args.model == "llama2-7b-dummy":
            flags += ["--load-format", "dummy"]
        if args.kv_cache_gib:
            flags += ["--kv-cache-bytes", str(args.kv_cache_gib * 2**30)]
        if args.step_logs:
            args.step_logs.mkdir(parents=True, exist_ok=True)
            flags += ["--step-log", str(args.step_logs / f"{mode}.jsonl")]
        profile = None
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            profile = args.profile / f"{mode}.prof"
        with ServeProcess(*flags, profile=profile) as server:
            tokenizer = load_model_info(model, Path(work))[1]

            async def run_all() -> dict[str, Any]:
                # Warm-up, untimed: each workload once at the smoke scale, so that what a server does once (Triton
                # compiling a kernel's variant, and caching it on disk, where only the first mode to run would
                # pay for it; CUDA loading a kernel's module on its first launch; a template's prefix context
                # filled) falls in neither mode's figures.
                warm = client(server, tokenizer, SCALES["smoke"], parrot)
                for name in tqdm(args.workloads, desc="warm-up"):
                    await getattr(warm, name)()
                await warm.close()
                driver = client(server, tokenizer, scale, parrot)
                if args.step_logs:
                    driver.chat_times = []
                results, spans, chats = {}, {}, {}
                for name in tqdm(args.workloads, desc=mode):
                    runs = []
                    for _ in range(args.repeats if name in REPEATABLE else 1):
                        start, first_chat = time.time(), len(driver.chat_times or ())
                        runs.append(await getattr(driver, name)())
                        spans.setdefault(name, []).append([start, time.time()])
                        chats.setdefault(name, []).append((driver.chat_times or [])[first_chat:])
                    results[name] = median_run(runs)
                await driver.close()
                if args.step_logs:  # when each workload (and each chat) ran, on the step log's clock
                    (args.step_logs / f"{mode}.spans.json").write_text(json.dumps(spans, indent=2) + "\n")
                    (args.step_logs / f"{mode}.chats.json").write_text(json.dumps(chats) + "\n")
                return results

            return asyncio.run(run_all())


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of a workload's repeated runs (in one server), the run of the median time (of an even number, the slower
    of the two in the middle), with every run's seconds."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda run: run["seconds"])
    return {**ordered[len(ordered) // 2], "repeats_seconds": [run["seconds"] for run in runs]}


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    """Hugging Face transformers `generate` on the same shapes and prompts' sizes, for the two workloads small
    enough for it: chain summary (one call after another) and map-reduce (the maps as one left-padded batch)."""
    import torch
    import transformers

    scale = SCALES[args.scale]
    with tempfile.TemporaryDirectory() as work:
        path = TINY if args.model == "tiny" else model_dir(args, Path(work))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
        config = transformers.AutoConfig.from_pretrained(path)
    torch.set_default_dtype(torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()  # random weights, as ours
    torch.set_default_dtype(torch.float32)
    text = Text(tokenizer)

    def generate(prompts: list[str], max_tokens: int) -> list[str]:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:])

    generate([text(16)], 4)  # warm-up
    chunks = [text(scale.chunk_tokens) for _ in range(scale.chain_chunks)]  # made before the clock starts
    start, summary = time.perf_counter(), "none"
    for chunk in chunks:
        summary = generate([f"{CHAIN_INSTRUCTION}Previous summary: {summary}\nPart: {chunk}\nSummary:"],
                           scale.summary_tokens)[0]
    results: dict[str, Any] = {"chain_summary": {"seconds": time.perf_counter() - start}, "map_reduce": {}}
    for n in tqdm(scale.map_chunks, desc="transformers map-reduce"):
        chunks = [text(scale.chunk_tokens) for _ in range(n)]
        start = time.perf_counter()
        parts = generate([f"{MAP_INSTRUCTION}Part: {c}\nSummary:" for c in chunks], scale.summary_tokens)
        generate([REDUCE_INSTRUCTION + "".join(f"- {p}\n" for p in parts) + "Summary:"], scale.summary_tokens)
        results["map_reduce"][str(n)] = {"seconds": time.perf_counter() - start}
    return results


def plot(result: dict[str, Any], path: Path) -> None:
    """Each workload's speedup over the baseline, beside the paper's bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [result["workloads"][n]["speedup"] for n in names], color="tab:blue", label="parrot_lc / baseline")
    ax.scatter([n for n in names if n in TARGETS], [TARGETS[n] for n in names if n in TARGETS], marker="_", s=900,
               color="tab:red", label="the paper's bar")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup (log scale)")
    ax.set_title(f"End to end, {result['model']}, {result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Results files of separate runs (on one device and model) as one, each workload from the last run of it."""
    if len({(r["device"], r["model"], json.dumps(r["scale"], sort_keys=True)) for r in results}) > 1:
        sys.exit("the results were measured on different devices, models or scales: they do not make one table")
    merged = {**results[0], "workloads": {}, "against": {}}
    for result in results:
        merged["workloads"].update(result["workloads"])
        for mode, workloads in result.get("against", {}).items():
            merged["against"].setdefault(mode, {}).update(workloads)
    return merged


def speedups(ours: dict[str, Any], base: dict[str, Any], scale: Scale) -> dict[str, Any]:
    """Each workload's figures side by side, with the speedup as its target reads."""
    out: dict[str, Any] = {}
    if "chain_summary" in ours:
        out["chain_summary"] = {"parrot": ours["chain_summary"], "baseline": base["chain_summary"],
                                "speedup": base["chain_summary"]["seconds"] / ours["chain_summary"]["seconds"]}
    if "map_reduce" in ours:
        by_chunks = {n: base["map_reduce"][n]["seconds"] / ours["map_reduce"][n]["seconds"] for n in ours["map_reduce"]}
        out["map_reduce"] = {"parrot": ours["map_reduce"], "baseline": base["map_reduce"],
                             "speedup_by_chunks": by_chunks, "speedup": by_chunks[str(max(scale.map_chunks))]}
    if "shared_prompt_chat" in ours:
        ours_chat, base_chat = ours["shared_prompt_chat"], base["shared_prompt_chat"]
        fit = str(base_chat["baseline_fit_users"])
        users = [u for u in ours_chat if u != "baseline_fit_users"]
        # Parrot's most users whose decode pace is no slower than the baseline's at its largest batch.
        pace = base_chat[fit]["mean_per_token_s"]
        most = max((int(u) for u in users if ours_chat[u]["mean_per_token_s"] <= pace), default=0)
        out["shared_prompt_chat"] = {
            "parrot": ours_chat, "baseline": base_chat,
            "baseline_largest_batch": int(fit),
            "parrot_users_at_baseline_pace": most,
            "speedup": most / int(fit),
            "latency_speedup": base_chat[fit]["mean_latency_s"] / ours_chat[fit]["mean_latency_s"],
        }
    if "multi_agent" in ours:
        out["multi_agent"] = {"parrot": ours["multi_agent"], "baseline": base["multi_agent"],
                              "speedup": base["multi_agent"]["seconds"] / ours["multi_agent"]["seconds"]}
    for name in APP_WORKLOADS:
        if name in ours:
            out[name] = {"parrot": ours[name], "baseline": base[name],
                         "speedup": ours[name]["requests_per_s"] / base[name]["requests_per_s"]}
    if "mixed" in ours:
        out["mixed"] = {"parrot": ours["mixed"], "baseline": base["mixed"],
                        "speedup": base["mixed"]["chat_mean_latency_s"] / ours["mixed"]["chat_mean_latency_s"],
                        "jobs_throughput_ratio": ours["mixed"]["jobs_per_minute"] / base["mixed"]["jobs_per_minute"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e.json"))
    parser.add_argument("--model", default="llama2-7b-dummy", help="`llama2-7b-dummy`, `tiny`, or a checkpoint")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--client", choices=sorted(CLIENTS), default="frontend", help="how the workloads are "
                        "written: `frontend`, semantic functions (parrot mode) and raw requests (baselines); "
                        "`langchain`, ChatParrot and LangGraph code, deferred in parrot mode and eager in the baselines")
    parser.add_argument("--kv-cache-gib", type=int, default=None, help="KV cache size (default: the engine's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--hf", action="store_true", help="also time transformers `generate` where it finishes")
    parser.add_argument("--repeats", type=int, default=1, help="run chain summary, multi-agent and GPTs-like this "
                        "many times in each server and report the run of the median time (and every run's time)")
    parser.add_argument("--step-logs", type=Path, help="a folder for each server's engine step log (MODE.jsonl), "
                        "the spans of its workloads' runs (MODE.spans.json) and of their chats (MODE.chats.json); "
                        "`step_timeline.py DIR` reads them")
    parser.add_argument("--profile", type=Path, help="run each server under cProfile, writing its stats to "
                        "DIR/MODE.prof (the server's process; its engine runs in a process of its own)")
    parser.add_argument("--replot", type=Path, help="only draw the plot of an existing results file")
    parser.add_argument("--merge", type=Path, nargs="+", help="only join the workloads of results files run on one "
                        "device (a workload in a later file replaces an earlier one's) into --out, and plot it")
    parser.add_argument("--mode", choices=[*MODES, "hf"], help="run one mode here and print its JSON")
    parser.add_argument("--baselines", nargs="+", choices=[m for m in MODES if m != "parrot"],
                        default=["baseline", "baseline_apc", "baseline_vllm"], help="the request-level modes to "
                        "compare against (the first is the one the plot and `workloads` read)")
    args = parser.parse_args()

    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    if args.merge:
        merged = merge_results([json.loads(path.read_text()) for path in args.merge])
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
        plot(merged, args.out.with_suffix(".png"))
        return
    if args.mode:  # a child: one server (or transformers), one mode
        figures = run_hf(args) if args.mode == "hf" else run_mode(args, args.mode)
        print("RESULT " + json.dumps(figures))
        return
    figures = {}
    # Each in a process of its own; parrot_lc first, so that a run cut short keeps its figures (MODE.json files).
    for mode in ["parrot", *args.baselines, *(["hf"] if args.hf else [])]:
        child = subprocess.run([sys.executable, *sys.argv, "--mode", mode], stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            sys.exit(f"the {mode} run failed (exit {child.returncode})")
        figures[mode] = json.loads(next(l for l in child.stdout.splitlines() if l.startswith("RESULT "))[7:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(f".{mode}.json").write_text(json.dumps(figures[mode], indent=2) + "\n")  # kept if later parts fail
    device = args.device
    if device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name()
    result = {
        "device": device,
        "model": "Llama-2-7B shapes, random bf16 weights, 1,024-token vocabulary" if args.model == "llama2-7b-dummy"
        else args.model,
        "scale": asdict(SCALES[args.scale]),
        "workloads": speedups(figures["parrot"], figures[args.baselines[0]], SCALES[args.scale]),
        # against each baseline: {baseline mode: {workload: figures and speedup}}
        "against": {mode: speedups(figures["parrot"], figures[mode], SCALES[args.scale]) for mode in args.baselines},
    }
    for name, hf_figures in figures.get("hf", {}).items():
        if name in result["workloads"]:  # transformers runs its two workloads whichever were asked for
            result["workloads"][name]["hf"] = hf_figures
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({mode: {k: {m: v.get(m) for m in ("speedup", "latency_speedup", "jobs_throughput_ratio") if m in v}
                             for k, v in against.items()} for mode, against in result["against"].items()}, indent=2))


if __name__ == "__main__":
    main()
