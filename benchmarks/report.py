"""Regenerate the README's results section from benchmarks/results/*.json (never typed by hand).

Usage: python benchmarks/report.py        (rewrites the part of README.md between the markers)
"""

import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"


def results(benchmark: str) -> list[tuple[str, dict]]:
    """(file name, contents) of one benchmark's result files, oldest first (by date, then name)."""
    runs = []
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", f"{benchmark}-*.json")):
        with open(path) as f:
            data = json.load(f)
        runs.append((data["environment"]["date"], os.path.basename(path), data))
    return [(name, data) for _, name, data in sorted(runs, key=lambda run: run[:2])]


def latest(benchmark: str) -> tuple[str, dict] | None:
    """The newest result file of one benchmark; for serving, the newest with its peer (floods
    against the offline engine alone come after its table, as notes)."""
    runs = results(benchmark)
    if benchmark == "serve":
        runs = [run for run in runs if _has_peer(run[1])] or runs
    return runs[-1] if runs else None


def _has_peer(data: dict) -> bool:
    return any(not e["engine"].startswith("pagedllm") for e in data["engines"])


def _source(data: dict, name: str) -> str:
    env = data["environment"]
    host = f", host Python probe {env['host_python_ms']:.1f} ms" if "host_python_ms" in env else ""
    return (f"{env['gpu']}, {env['date']}, torch {env['torch']}, triton {env['triton']}{host}, "
            f"commit {str(env['git_commit'])[:10]} (`benchmarks/results/{name}`)")


def _peaks(data: dict) -> tuple[str, str, str]:
    """(GPU, copy bandwidth, matmul peak) the fractions of a result are taken of; files from before
    the peaks were recorded were all H100 runs."""
    peaks = data["environment"].get("peaks", {"gpu": "H100", "hbm_bytes_per_s": 3.0e12, "bf16_flops": 7.9e14})
    return peaks["gpu"], f"{peaks['hbm_bytes_per_s'] / 1e12:.1f} TB/s", f"{peaks['bf16_flops'] / 1e12:.0f} TFLOP/s"


def kernels_section(name: str, data: dict) -> list[str]:
    layout = data["layout"]
    _, bandwidth, matmul = _peaks(data)
    lines = [
        f"**PagedAttention kernels** (`python benchmarks/attention_kernels.py`): {layout['num_heads']} query heads on "
        f"{layout['num_kv_heads']} KV heads, head_dim {layout['head_dim']}, {layout['dtype'].split('.')[-1]}, "
        f"blocks of {layout['block_size']} in shuffled order, beside torch SDPA over the same K/V held densely "
        "(prefill: through its flash backend, FlashAttention-2, and its cuDNN backend, its default on Hopper). "
        f"{_source(data, name)}.",
        "",
        f"| decode batch x context | paged µs | GB/s | of {bandwidth} | SDPA (dense) µs | paged / SDPA time |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if r["kind"] == "decode":
            lines.append(f"| {r['batch']} x {r['context']} | {r['paged_ms'] * 1e3:.1f} | "
                         f"{r['paged_bytes_per_s'] / 1e9:.0f} | {100 * r['paged_hbm_fraction']:.0f}% | "
                         f"{r['sdpa_dense_ms'] * 1e3:.1f} | {r['paged_over_sdpa_time']:.2f} |")
    lines += ["", f"| causal prefill prompts x tokens | paged ms | TFLOP/s | of {matmul} | SDPA flash ms | "
                  "paged / flash time | SDPA cuDNN ms | paged / cuDNN time |", "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if r["kind"] == "prefill":
            peers = " | ".join(f"{r[f'sdpa_{b}_ms']:.3f} | {r[f'paged_over_{b}_time']:.2f}" if f"sdpa_{b}_ms" in r
                               else "- | -" for b in ("flash", "cudnn"))
            lines.append(f"| {r.get('seqs', 1)} x {r['tokens']} | {r['paged_ms']:.3f} | "
                         f"{r['paged_flops_per_s'] / 1e12:.0f} | "
                         f"{100 * r['paged_peak_fraction']:.0f}% | {peers} |")
    for s in data.get("skipped", []):
        lines.append(f"\nNot run: decode {s['batch']} x {s['context']} ({s['reason']}).")
    return lines


def fp8_section(name: str, data: dict) -> list[str]:
    lines = [
        "**FP8** (`python benchmarks/fp8.py`): each workload run by pagedllm in its dtype and in FP8, in one "
        f"process on the same prompts. {_source(data, name)}.",
        "",
        "| workload | FP8 setting | dtype tok/s | FP8 tok/s | speed-up | target |",
        "|---|---|---|---|---|---|",
    ]
    for p in data["pairs"]:
        setting = ", ".join(f"`{k}={v!r}`" for k, v in p["fp8_args"].items())
        rates = [_rate(p[run]["output_tokens_per_s"]) for run in ("dtype_run", "fp8_run")]
        lines.append(f"| {p['workload']} {p['model_config']} | {setting} | {rates[0]} | {rates[1]} | "
                     f"{p['speedup']:.2f} | >= {p['target']} |")
    lines += ["", "Greedy agreement with the dtype's run (first 64 tokens of 16 prompts): " + "; ".join(
        f"{model}: {a['mean_shared']:.1f} tokens shared on average before they part, {a['identical']}/16 identical"
        for model, a in data["greedy_agreement"].items()) + "."]
    if "demo_held_out_loss" in data:
        lines += ["", "The demo model's loss on a page it did not train on: " + ", ".join(
            f"{label} {loss:.4f}" for label, loss in data["demo_held_out_loss"].items()) + "."]
    return lines


def moe_section(name: str, data: dict) -> list[str]:
    lines = [
        "**Fused-MoE kernel** (`python benchmarks/moe.py`): one MoE layer of each model, bf16, random weights "
        "and routing; the fraction of the roofline is the larger of compute and weight-read time at the GPU's "
        f"peaks over the kernel's time; HF's expert-by-expert loop on the same inputs as the peer. "
        f"{_source(data, name)}.",
        "",
        "| layer | tokens | fused µs | TFLOP/s | TB/s | of the roofline | HF loop µs | x HF loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(f"| {r['model']} ({r['experts']} experts, top {r['top_k']}) | {r['tokens']} | "
                     f"{r['fused_ms'] * 1e3:,.0f} | {r['tflops']:.0f} | {r['tb_per_s']:.2f} | "
                     f"{r['roofline_fraction']:.2f} | {r['hf_loop_ms'] * 1e3:,.0f} | {r['speedup_over_hf_loop']:.1f} |")
    return lines


PEERS = ("hf-static-bs64", "hf-static-bs256", "hf-continuous-batching")
WORKLOAD_ORDER = ("W1", "W2", "W3", "W4", "L1", "L2", "W5", "W6")


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.1f}"


def throughput_section() -> list[str]:
    lines = [
        "**Throughput** (`python benchmarks/throughput.py --workload W1`): output tokens/s, each workload with "
        "its HF peers in the same run on the same prompts (workloads: `benchmarks/README.md`; random "
        "weights from the real configs, EOS ignored). Roofline fraction: the least time the run's own steps "
        "could take on the run's GPU (weights + K/V read at its copy bandwidth, or FLOPs at its matmul peak: "
        "H100 3.0 TB/s and 790 TFLOP/s, H200 4.3 TB/s and 790 TFLOP/s) over the time taken. A peer still "
        "running at the run's time limit per peer (`--peer-time-limit`) is stopped: its rate was below the "
        "figure shown (all output tokens over the limit). pagedllm runs at the engine's defaults on the run's "
        "GPU; its batch limits are shown (`max_num_seqs` / `max_num_batched_tokens`).",
        "",
        "| workload | model | pagedllm | batch limits | HF static bs64 | HF static bs256 | HF continuous batching | "
        "x best HF | roofline fraction | KV waste | start-up s | result file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload in WORKLOAD_ORDER:
        found = latest(f"throughput-{workload}")
        if not found:
            continue
        name, data = found
        ours = data["pagedllm"]
        peers = {p["engine"]: p for p in data["peers"]}
        # a workload with one static batch size of its own (L1: 1, W4: 32) shows it in the first static column
        own = [e for e in peers if e.startswith("hf-static-") and e not in PEERS]
        cells = []
        for engine in PEERS:
            peer = peers.get(engine)
            if peer is None and engine == PEERS[0] and own:
                peer = peers[own[0]]
            label = f" ({peer['engine'].removeprefix('hf-static-')})" if peer and peer["engine"] not in PEERS else ""
            if peer is None:
                cells.append("not run")
            elif "output_tokens_per_s_below" in peer:  # stopped at the run's time limit per peer
                cells.append(f"< {_rate(peer['output_tokens_per_s_below'])}{label} (stopped)")
            elif "error" in peer:
                cells.append(f"failed: {peer['error'].split(':')[0]}{label}")
            else:
                cells.append(f"{_rate(peer['output_tokens_per_s'])}{label}")
        ratio = f"{ours['ratio_vs_best_hf']:.2f}" if ours.get("ratio_vs_best_hf") else "-"
        below = [p["output_tokens_per_s_below"] for p in data["peers"] if "output_tokens_per_s_below" in p]
        done = [p["output_tokens_per_s"] for p in data["peers"] if "output_tokens_per_s" in p]
        if below and max(below) > max(done, default=0):  # a stopped peer might have been the best
            ratio = f"> {ours['output_tokens_per_s'] / max(below):.1f}"
        lines.append(
            f"| {workload} | {data['model_config']} {data['dtype']} | {_rate(ours['output_tokens_per_s'])} | "
            f"{ours.get('max_num_seqs', '?')} / {ours.get('max_num_batched_tokens', '?')} | "
            + " | ".join(cells)
            + f" | {ratio} | {ours['roofline_fraction']:.2f} | {100 * ours['kv_waste_fraction']:.2f}% | "
            f"{ours['startup_s']:.1f} | `{name}` ({data['environment']['gpu']}, commit "
            f"{str(data['environment']['git_commit'])[:10]}) |")
    return lines if len(lines) > 4 else []


SCALING_TARGETS = {("W2", "tensor", 2): 1.7, ("W2", "tensor", 4): 2.8, ("W3", "data", 2): 1.9, ("W3", "data", 4): 3.8}


def scaling_files() -> list[tuple[str, dict]]:
    """The newest result of each (workload, parallelism, most GPUs), in that order."""
    newest = {}
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "scaling-*.json")):
        with open(path) as f:
            data = json.load(f)
        key = (data["workload"], data["parallelism"], max(r["gpus"] for r in data["runs"]))
        name = os.path.basename(path)
        if key not in newest or (data["environment"]["date"], name) > (newest[key][1]["environment"]["date"],
                                                                        newest[key][0]):
            newest[key] = (name, data)
    return [newest[key] for key in sorted(newest)]


def scaling_section() -> list[str]:
    files = scaling_files()
    if not files:
        return []
    lines = [
        "**Several GPUs** (`python benchmarks/scaling.py --workload W2 --tensor-parallel-size 1 2 4`, "
        "`--workload W3 --data-parallel-size 1 2 4`): output tokens/s of each size in a fresh process, "
        "against one GPU in the same run. Tensor parallelism: one engine split over the GPUs; the all-reduce "
        "share is rank 0's all-reduce kernel time over its kernel time in 16 decode steps of 256 sequences "
        "(torch profiler). Data parallelism: replicas of one GPU each; the bound is one GPU's time over the "
        "time of W3's longest request alone (1,024 output tokens), which no number of replicas can beat. "
        "Greedy: prompts of 8 whose first 32 greedy tokens (bf16, random weights) equal one GPU's.",
        "",
        "| workload | parallelism | GPUs | all-reduce | output tok/s | x one GPU | per-GPU efficiency | target | "
        "all-reduce share | bound | greedy | result file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data in files:
        base = next(r for r in data["runs"] if r["gpus"] == 1)
        for run in data["runs"]:
            if run["gpus"] == 1 or "speedup" not in run:
                continue
            target = SCALING_TARGETS.get((data["workload"], data["parallelism"], run["gpus"]))
            share = run.get("decode_profile", {}).get("all_reduce_share_of_kernel_time")
            agreement = run.get("greedy_agreement")
            cells = [
                f"{data['workload']} {data['model_config']}", data["parallelism"], str(run["gpus"]),
                run.get("all_reduce") or "-",
                f"{_rate(run['output_tokens_per_s'])} (one GPU {_rate(base['output_tokens_per_s'])})",
                f"{run['speedup']:.2f}", f"{run['per_gpu_efficiency']:.2f}", f">= {target}" if target else "-",
                f"{100 * share:.0f}%" if share is not None else "-",
                f"{run['speedup_bound']:.2f}" if "speedup_bound" in run else "-",
                f"{agreement['prompts_equal']}/{agreement['prompts']}" if agreement else "-",
                f"`{name}` ({data['environment']['gpu']}, commit {str(data['environment']['git_commit'])[:10]})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def structured_section(name: str, data: dict) -> list[str]:
    free_runs, half_runs = data["free"], data["half_constrained"]
    free_rate = sum(r["output_tokens"] for r in free_runs) / sum(r["wall_s"] for r in free_runs)
    lines = [
        f"**Structured outputs** (`python benchmarks/structured.py`): {data['workload']} ({data['model_config']}, "
        f"{data['num_requests']} requests) at temperature 1 with per-request seeds, run free and with every second "
        f"request under the JSON schema `{data['schema']}`, alternating, in one process; the tokenizer is a "
        f"{data['tokenizer']} (random weights come without one). Host seconds per phase of the run's steps; the "
        f"mask fill and the accepts are inside the launch and the read back. The runs follow a warm-up of a few "
        f"free and a few constrained requests (the first constrained ones took "
        f"{data['warm_up_first_constrained_requests_s']:.1f} s: the vocabulary pass and the schema's compile). "
        f"Half constrained runs at **{data['throughput_vs_free']:.2f}** of free (total rates; target >= 0.9). "
        f"{_source(data, name)}.",
        "",
        "| run | output tok/s | x free | wall s | steps | launch s | mask fill s | read back s | accept s | "
        "waiting for the device s | constrained finish reasons |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for repeat, (free, half) in enumerate(zip(free_runs, half_runs, strict=True), 1):
        for label, run in ((f"free ({repeat})", free), (f"half constrained ({repeat})", half)):
            reasons = ", ".join(f"{k} {v}" for k, v in run["constrained_finish_reasons"].items()) or "-"
            lines.append(f"| {label} | {_rate(run['output_tokens_per_s'])} | "
                         f"{run['output_tokens_per_s'] / free_rate:.2f} | {run['wall_s']:.1f} | {run['steps']} | "
                         f"{run['launch_s']:.1f} | {run['mask_fill_s']:.1f} | {run['read_back_s']:.1f} | "
                         f"{run['accept_token_s']:.1f} | {run['wait_for_device_s']:.1f} | {reasons} |")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def serve_section(name: str, data: dict) -> list[str]:
    engines = [e for e in data["engines"] if "runs" in e]
    lines = [
        f"**Serving** (`python benchmarks/serve.py`): {data['num_requests']} streamed chat completions per "
        f"offered rate ({data['input_len']} prompt tokens, {data['output_len']} output tokens, greedy; "
        f"{data['model_config']} {data['dtype']}, random weights), Poisson arrivals (inf: all at once) from "
        f"{data['client_processes']} processes of {data.get('client', 'the official `openai` client')}; "
        f"`transformers serve "
        f"--continuous-batching` on the same checkpoint and prompts in the same run. Time-to-first-token "
        f"(TTFT) and inter-token latency (ITL, between streamed chunks) in ms. {_source(data, name)}.",
        "",
        "| offered req/s | engine | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | done / failed / stopped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in range(len(engines[0]["runs"]) if engines else 0):  # every engine that ran ran every rate
        for engine in engines:
            r = engine["runs"][i]
            lines.append(f"| {r['rate']:g} | {engine['engine']} | {_rate(r['output_tokens_per_s'])} | "
                         f"{_ms(r['ttft_p50_ms'])} | {_ms(r['ttft_p99_ms'])} | {_ms(r['itl_p50_ms'])} | "
                         f"{_ms(r['itl_p99_ms'])} | {r['completed']} / {r['failed']} / {r['stopped']} |")
    notes = []
    # the ratio is the file's (one pagedllm server, older results) or each pagedllm server's
    for source in [s for s in [data] + engines if "served_over_offline_at_rate_inf" in s]:
        offline = _rate(data["offline"]["output_tokens_per_s"])
        runs = source.get("served_over_offline_at_rate_inf_runs", [])
        each = f" (the median of {len(runs)} floods: {', '.join(f'{r:.2f}' for r in runs)})" if len(runs) > 1 else ""
        notes.append(f"The offline `LLM` on the same prompts in the same run{_batch_limits(data, source)}: "
                     f"{offline} output tok/s; "
                     f"{source.get('engine', 'pagedllm')} served at rate inf: "
                     f"**{source['served_over_offline_at_rate_inf']:.2f}** of it{each}")
    for engine in data["engines"]:
        flood = [r for r in engine.get("runs", []) if r["rate"] == float("inf") and r.get("content_chunks")]
        if flood:
            notes.append(f"{engine['engine']} at rate inf: {flood[0]['content_chunks']:,} content chunks for "
                         f"{flood[0]['output_tokens']:,} tokens (a chunk carries the tokens that waited while the "
                         "server was busy, and a token that completes no character goes with the next; ITL is "
                         "between chunks)")
        if "error" in engine:
            notes.append(f"{engine['engine']} failed: {engine['error']}")
        no_text = [r["no_text"] for r in engine.get("runs", [])]
        if any(no_text):
            notes.append(f"{engine['engine']}: {'/'.join(map(str, no_text))} streams per rate ended with a finish "
                         "reason and usage but streamed no text; their tokens count, their latencies do not")
    notes += _later_floods(data["environment"]["date"])
    return lines + ([""] + [f"{note}." for note in notes] if notes else [])


def _batch_limits(data: dict, server: dict) -> str:
    """The offline engine's batch limits beside the server's step, where the file records them (since
    2026-12-06: on a large GPU the `LLM`'s defaults step twice the tokens the server does)."""
    offline = data["offline"]
    if "max_num_batched_tokens" not in offline:
        return ""
    text = (f" (at its defaults, {offline['max_num_seqs']} sequences and {offline['max_num_batched_tokens']:,} "
            "tokens a step")
    if "max_num_batched_tokens" in server:
        text += f"; the server at most {server['max_num_batched_tokens']:,} tokens a step"
    return text + ")"


def _later_floods(date: str) -> list[str]:
    """A line for each run of floods alone (no peer) after the table's: what each server served of
    the offline engine's throughput in that run."""
    notes = []
    for name, data in results("serve"):
        if _has_peer(data) or data["environment"]["date"] <= date:
            continue
        servers = "; ".join(f"{e['engine']} **{e['served_over_offline_at_rate_inf']:.2f}** ("
                            + ", ".join(f"{r:.2f}" for r in e.get("served_over_offline_at_rate_inf_runs", [])) + ")"
                            for e in data["engines"] if "served_over_offline_at_rate_inf" in e)
        notes.append(f"Floods since, {data['num_requests']} streams at once against the warm offline engine "
                     f"({_rate(data['offline']['output_tokens_per_s'])} output tok/s"
                     f"{_batch_limits(data, next(iter(data['engines']), {}))}) in the same run, no peer "
                     f"({_source(data, name)}), load from {data['client_processes']} processes of "
                     f"{data.get('client', 'the official `openai` client')}: served of it, the median of each "
                     f"server's floods: {servers}")
    return notes


def render() -> str:
    sections = []
    throughput = throughput_section()
    if throughput:
        sections.append("\n".join(throughput))
    scaling = scaling_section()
    if scaling:
        sections.append("\n".join(scaling))
    for benchmark, section in (("structured", structured_section), ("serve", serve_section),
                               ("kernels", kernels_section), ("moe", moe_section), ("fp8", fp8_section)):
        result = latest(benchmark)
        if result:
            sections.append("\n".join(section(*result)))
    return "\n\n".join(sections) if sections else "No benchmark results yet."


def main() -> None:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{START}\n{render()}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
