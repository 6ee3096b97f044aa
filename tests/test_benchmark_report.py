"""The README's results section is generated from the result files, and matches them."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, report  # noqa: E402


def test_readme_results_section_is_what_report_generates():
    with open(os.path.join(report.ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split(report.START, 1)[1].split(report.END, 1)[0]
    assert section.strip() == report.render().strip(), "run `python benchmarks/report.py`"


def test_kernel_table_rows_come_from_the_latest_result():
    name, data = report.latest("kernels")
    lines = report.kernels_section(name, data)
    decode_rows = [r for r in data["results"] if r["kind"] == "decode"]
    cells = [line.split("|")[1].strip() for line in lines if line.startswith("| ")]
    expected = [f"{r['batch']} x {r['context']}" for r in decode_rows]
    expected += [f"{r.get('seqs', 1)} x {r['tokens']}" for r in data["results"] if r["kind"] == "prefill"]
    assert [c for c in cells if " x " in c and c[0].isdigit()] == expected
    assert name in lines[0]


def test_throughput_rows_show_stopped_peers_as_bounds():
    rows = {line.split("|")[1].strip(): line for line in report.throughput_section() if line.startswith("| W")}
    for workload, row in rows.items():
        _, data = report.latest(f"throughput-{workload}")
        for peer in data["peers"]:
            if "output_tokens_per_s_below" in peer:
                assert f"< {report._rate(peer['output_tokens_per_s_below'])}" in row
        ours = data["pagedllm"]
        if ours.get("ratio_vs_best_hf") and "> " not in row:
            assert f"| {ours['ratio_vs_best_hf']:.2f} |" in row


def test_serve_rows_come_from_the_latest_result():
    name, data = report.latest("serve")
    rows = [line for line in report.serve_section(name, data) if line.startswith("| ") and "---" not in line][1:]
    engines = [engine for engine in data["engines"] if "runs" in engine]
    runs = [(engine["engine"], engine["runs"][i]) for i in range(len(engines[0]["runs"])) for engine in engines]
    assert len(rows) == len(runs)
    for row, (engine, run) in zip(rows, runs, strict=True):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[:3] == [f"{run['rate']:g}", engine, report._rate(run["output_tokens_per_s"])]
        assert cells[-1] == f"{run['completed']} / {run['failed']} / {run['stopped']}"


def test_serve_table_is_the_newest_run_with_its_peer_and_later_floods_are_notes():
    """Floods against the offline engine alone (no peer) do not replace the table of the run that
    has its peer; each later one is a note under it, with each server's ratio."""
    name, data = report.latest("serve")
    assert any(not e["engine"].startswith("pagedllm") for e in data["engines"])
    later = [(n, d) for n, d in report.results("serve")
             if all(e["engine"].startswith("pagedllm") for e in d["engines"])
             and d["environment"]["date"] > data["environment"]["date"]]
    assert later  # (serve-h200-2026-12-05-floods-2cd2fa6.json)
    notes = "\n".join(report.serve_section(name, data))
    for later_name, later_data in later:
        assert later_name in notes
        for engine in later_data["engines"]:
            assert f"{engine['engine']} **{engine['served_over_offline_at_rate_inf']:.2f}**" in notes


def test_serve_notes_give_each_api_server_counts_ratio():
    name, data = report.latest("serve")
    data = dict(data)
    engines = [e for e in data["engines"] if "runs" in e]
    data.pop("served_over_offline_at_rate_inf", None)
    data["engines"] = [dict(engines[0], engine="pagedllm", served_over_offline_at_rate_inf=0.61,
                            served_over_offline_at_rate_inf_runs=[0.61]),
                       dict(engines[0], engine="pagedllm (2 API servers)", served_over_offline_at_rate_inf=0.83,
                            served_over_offline_at_rate_inf_runs=[0.8, 0.83, 0.9])]
    notes = "\n".join(report.serve_section(name, data))
    assert "pagedllm served at rate inf: **0.61** of it." in notes
    assert "pagedllm (2 API servers) served at rate inf: **0.83** of it (the median of 3 floods: 0.80, 0.83, 0.90)" \
        in notes


def test_moe_section_has_a_row_per_measured_layer():
    data = {"environment": {"gpu": "NVIDIA H200", "date": "2026-12-02", "torch": "t", "triton": "t",
                            "git_commit": "abc"},
            "results": [{"model": "qwen3-30b-a3b", "experts": 128, "top_k": 8, "tokens": n, "fused_ms": 0.4,
                         "tflops": 46.5, "tb_per_s": 2.9, "roofline_fraction": 0.68, "hf_loop_ms": 22.0,
                         "speedup_over_hf_loop": 55.0} for n in (1, 256)]}
    rows = [line for line in report.moe_section("moe-h200-2026-12-02.json", data) if line.startswith("| qwen3")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "256"]
    assert "| 400 | 46 | 2.90 | 0.68 | 22,000 | 55.0 |" in rows[1]


def test_fp8_section_has_a_row_per_pair_and_the_agreement():
    run = {"output_tokens_per_s": 10000.0}
    data = {"environment": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-03", "torch": "t", "triton": "t",
                            "git_commit": "abc"},
            "pairs": [{"workload": "W2", "model_config": "llama-3-8b", "fp8_args": {"quantization": "fp8"},
                       "target": 1.3, "speedup": 1.45, "dtype_run": run, "fp8_run": {"output_tokens_per_s": 14500.0}}],
            "greedy_agreement": {"demo": {"mean_shared": 41.5, "identical": 7}}}
    lines = report.fp8_section("fp8-h100-2026-12-03.json", data)
    assert "| W2 llama-3-8b | `quantization='fp8'` | 10,000 | 14,500 | 1.45 | >= 1.3 |" in lines
    assert "demo: 41.5 tokens shared on average before they part, 7/16 identical" in lines[-1]


def test_time_split_counts_decode_steps_by_batch_size():
    from benchmarks.throughput import time_split

    steps = [[(1, 9)] * 3, [(1, 9)] * 200, [(1, 9)] * 8, [(16, 16), (1, 9)], [(1, 9)] * 40]
    split = time_split(steps, [0.1, 0.2, 0.3, 0.4, 0.5], [0.01, 0.02, 0.03, 0.04, 0.05])
    assert split["decode"] == {"steps": 4, "measured_s": 0.1 + 0.2 + 0.3 + 0.5, "least_s": 0.01 + 0.02 + 0.03 + 0.05}
    assert split["prefill"] == {"steps": 1, "measured_s": 0.4, "least_s": 0.04}  # a prompt chunk: not decode
    by_batch = split["decode_by_batch"]
    assert {k: v["steps"] for k, v in by_batch.items()} == {"1-8": 2, "9-32": 0, "33-128": 1, "129+": 1}
    assert by_batch["1-8"]["measured_s"] == 0.1 + 0.3 and by_batch["129+"]["least_s"] == 0.02


def test_a_step_is_timed_to_its_read_back_so_a_pipelined_prefill_keeps_its_time():
    """Async scheduling launches step k+1 before step k-1 is read back: a 1 s prefill then 0.1 s
    decodes, the host instant, are launched at 0, 0, 1.0 and read back at 1.0, 1.1, 1.2. Timed
    launch to launch the prefill took 0 s and the first decode 1.0 s."""
    from benchmarks.throughput import step_periods

    assert step_periods(0.0, [1.0, 1.1, 1.2]) == pytest.approx([1.0, 0.1, 0.1])
    assert step_periods(5.0, [5.5]) == [0.5]  # the plain loop: launch, then read back


def test_the_offline_ceiling_names_its_batch_limits_beside_the_servers_where_recorded():
    """On a large GPU the offline `LLM` steps 16,384 tokens where the server steps 8,192: a serve result
    that records both says so beside the ratio; older files, which do not, read as before."""
    import copy

    name, data = report.latest("serve")
    assert "at its defaults" not in "\n".join(report.serve_section(name, data))
    data = copy.deepcopy(data)
    data["offline"] |= {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}
    for engine in data["engines"]:
        if "served_over_offline_at_rate_inf" in engine:
            engine["max_num_batched_tokens"] = 8192
    notes = "\n".join(report.serve_section(name, data))
    assert ("same run (at its defaults, 1024 sequences and 16,384 tokens a step; the server at most 8,192 tokens "
            "a step):") in notes


def test_a_result_names_its_host_by_the_python_probe_where_it_has_one():
    """Hosts that name the same CPU serve at different speeds: a result says how fast its host ran
    plain Python, and older results (without the probe) are cited as before."""
    name, data = report.latest("serve")
    env = dict(data["environment"])
    env.pop("host_python_ms", None)
    assert "host Python probe" not in report._source({**data, "environment": env}, name)
    probed = report._source({**data, "environment": {**env, "host_python_ms": 4.256}}, name)
    assert "host Python probe 4.3 ms" in probed and name in probed
    assert 0 < common.host_python_ms() < 10_000
