"""Ray Data on a two-node cluster on this machine (one CPU each): replicas of the demo model give
LLM.generate's greedy outputs, bad rows carry their errors, and a replica that dies mid-job costs
no row and repeats none."""

import os
import sys

import pytest

ray = pytest.importorskip("ray")

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.ray import ERROR_COLUMN, PagedLLMProcessorConfig, build_processor  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "pagedllm-demo")
GREEDY = {"max_tokens": 8, "temperature": 0}
BAD = {"empty": {"text": ""}, "too long": {"text": "x " * 2000},
       "bad sampling": {"text": "def f(x):", "sampling_params": {"max_tokens": 8, "temperature": -1}},
       "unknown field": {"text": "def f(x):", "sampling_params": {"max_tokens": 8, "tempreature": 0}},
       "no prompt": {"text": None},
       "several samples": {"text": "def f(x):", "sampling_params": {"max_tokens": 8, "n": 2, "temperature": 1.0}}}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def expected():
    prompts = [f"def f{i}(x):" for i in range(300)]
    outputs = LLM(DEMO, device="cpu").generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    return {i: o.outputs[0].text for i, o in enumerate(outputs)}


def config(**overrides) -> PagedLLMProcessorConfig:
    fields = {"model_source": DEMO, "engine_kwargs": {"device": "cpu"}, "concurrency": 2, "batch_size": 16,
              "num_gpus_per_replica": 0, "num_cpus_per_replica": 1, "should_continue_on_error": True}
    return PagedLLMProcessorConfig(**fields | overrides)


def rows() -> list[dict]:
    good = [{"id": str(i), "text": f"def f{i}(x):", "sampling_params": GREEDY} for i in range(300)]
    bad = [{"id": f"bad {name}", "sampling_params": GREEDY} | row for name, row in BAD.items()]
    seeded = {"id": "seeded", "text": "def h(x):", "sampling_params": GREEDY | {"seed": 3}}  # (the only row with one)
    return good[:150] + bad + [seeded] + good[150:]


def preprocess(row: dict) -> dict:
    return {"id": row["id"], "prompt": row["text"], "sampling_params": row["sampling_params"]}


def test_every_row_once_good_ones_as_llm_generate_bad_ones_with_their_error(cluster, expected):
    processor = build_processor(config(), preprocess=preprocess,
                                postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"],
                                                         "tokens": row["num_generated_tokens"],
                                                         "error": row[ERROR_COLUMN]})
    out = processor(ray.data.from_items(rows())).take_all()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows())  # every row, once
    by_id = {r["id"]: r for r in out}
    for i, text in expected.items():
        i = str(i)
        assert by_id[i]["answer"] == text and by_id[i]["error"] is None and by_id[i]["tokens"] == 8, by_id[i]
    errors = {name: by_id[f"bad {name}"]["error"] for name in BAD}
    assert "empty" in errors["empty"] and "max_model_len" in errors["too long"]
    assert "temperature" in errors["bad sampling"] and "tempreature" in errors["unknown field"]
    assert "prompt" in errors["no prompt"]
    assert "SamplingParams.n=2 is invalid here: a row gets one completion" in errors["several samples"]
    assert by_id["seeded"]["error"] is None and by_id["seeded"]["tokens"] == 8  # (its seed came as 3.0: refused)


def test_without_continue_on_error_a_bad_row_fails_the_job_naming_it(cluster):
    processor = build_processor(config(should_continue_on_error=False), preprocess=preprocess)
    data = [{"id": "0", "text": "def f(x):", "sampling_params": GREEDY},
            {"id": "the bad one", "text": "", "sampling_params": GREEDY}]
    with pytest.raises(Exception, match="the bad one") as caught:
        processor(ray.data.from_items(data)).take_all()
    assert "empty" in str(caught.value)


def test_chat_rows_and_token_id_rows(cluster):
    data = [{"id": 0, "prompt": [5, 6, 7], "sampling_params": GREEDY},
            {"id": 1, "messages": [{"role": "user", "content": "def f(x):"}], "sampling_params": GREEDY}]
    out = {r["id"]: r for r in build_processor(config(concurrency=1))(ray.data.from_items(data)).take_all()}
    llm = LLM(DEMO, device="cpu")
    assert list(out[0]["generated_token_ids"]) == llm.generate([[5, 6, 7]], SamplingParams(**GREEDY),
                                                                  use_tqdm=False)[0].outputs[0].token_ids
    assert out[0]["num_input_tokens"] == 3
    chat = llm.chat([{"role": "user", "content": "def f(x):"}], SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert out[1]["generated_text"] == chat.outputs[0].text


def test_a_replica_killed_mid_job_costs_no_row_and_repeats_none(cluster, expected, tmp_path):
    marker = str(tmp_path / "killed")

    def kill_once(row: dict) -> dict:
        if row["id"] == 200 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the actor's process dies with its batch half done
        return preprocess(row)

    good = [{"id": i, "text": f"def f{i}(x):", "sampling_params": GREEDY} for i in range(300)]
    out = build_processor(config(), preprocess=kill_once)(ray.data.from_items(good)).take_all()
    assert os.path.exists(marker)
    assert sorted(r["id"] for r in out) == list(range(300))
    assert all(r["generated_text"] == expected[r["id"]] for r in out)


@pytest.mark.parametrize("field, value", [("concurrency", 0), ("batch_size", "8"), ("engine_kwargs", {"bogus": 1}),
                                          ("num_gpus_per_replica", -1), ("model_source", "")])
def test_bad_configs_are_named(field, value):
    with pytest.raises(ValueError, match=field if field != "engine_kwargs" else "bogus"):
        config(**{field: value})


def test_generate_command_on_ray_resumes_and_equals_the_local_run(cluster, tmp_path, capsys):
    import json

    from pagedllm.entrypoints.cli import main

    inp, local, remote = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    lines = [{"id": i, "prompt": f"def f{i}(x):"} for i in range(40)] + [
        {"id": "chat", "messages": [{"role": "user", "content": "def main():"}]},
        {"id": ["a", 1], "prompt": "x = ", "response_format": {"type": "json_schema",
                                                              "json_schema": {"schema": {"enum": ["up", "down"]}}}},
        {"id": "both", "prompt": "?", "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        {"id": "empty", "prompt": ""}]
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["--model", DEMO, "--input", str(inp), "--device", "cpu", "--temperature", "0", "--max-tokens", "6",
              "--skip-bad-lines"]
    assert main(["generate", *common, "--output", str(local)]) == 0
    remote.write_text(json.dumps({"id": 3, "text": "kept", "finish_reason": "stop"}) + "\n")  # done before
    assert main(["generate", *common, "--output", str(remote), "--ray", cluster.address, "--replicas", "2"]) == 0
    got = [json.loads(line) for line in remote.read_text().splitlines()]
    assert sorted(json.dumps(r["id"]) for r in got) == sorted(json.dumps(line["id"]) for line in lines[:-2])
    expected = {json.dumps(r["id"]): r for r in map(json.loads, local.read_text().splitlines())}
    for result in got[1:]:
        assert result == expected[json.dumps(result["id"])]
    assert json.loads(expected[json.dumps(["a", 1])]["text"]) in ("up", "down")
    capsys.readouterr()  # without --skip-bad-lines a bad line stops the job, named: checked here, or in a replica
    assert main(["generate", *common[:-1], "--output", str(tmp_path / "stop.jsonl"), "--ray", cluster.address]) != 0
    assert "line 43: give response_format or structured_outputs, not both" in capsys.readouterr().err
    inp.write_text("".join(json.dumps(line) + "\n" for line in [lines[0], lines[-1]]))
    assert main(["generate", *common[:-1], "--output", str(tmp_path / "stop2.jsonl"), "--ray", cluster.address]) != 0
    assert "line 2: the prompt is empty" in capsys.readouterr().err
