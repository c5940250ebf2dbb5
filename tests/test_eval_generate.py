"""Generation from a tiny random GPT-Neo export: routing in, code view out, stopping, resume, CLI."""

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    set_seed,
)

from ds_train.data.encode import encode_prompt
from eval.cli import main
from eval.generate import BlockEnd, CodeView, Generator, ModalityMap, Settings, generate_samples, prompt_ids
from eval.incremental import subtasks
from eval.problems import load_benchmark, load_problems

ASSETS = Path(__file__).parent / "assets"
GREEDY = Settings(greedy=True, max_new_tokens=24, batch_size=4)


def make_export(out: Path, copy_code_rows: bool = False) -> tuple[int, list[int]]:
    """A tiny random GPTNeoForCausalLM over the test tokenizer + its partial separated ids."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    separated = json.loads((ASSETS / "tokenizer" / "separation.json").read_text())["partial"]
    v = len(tokenizer)
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=v + len(separated),
        max_position_embeddings=1024,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
        intermediate_size=64,
        bos_token_id=tokenizer.convert_tokens_to_ids("<bot>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<eot>"),
    )
    model = GPTNeoForCausalLM(config)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        # the separated tokens' rows (E's and C's) four times longer, so that greedy decoding of this
        # random model picks separated tokens, whatever the tokenizer's share of them
        wte[separated] *= 4
        wte[v:] *= 4
        if copy_code_rows:  # C initialised as a copy of the separated rows of E
            wte[v:] = wte[separated]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "modality_map.json").write_text(
        json.dumps({"separation": "partial", "base_vocab_size": v, "separated_ids": separated})
    )
    return v, separated


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    v, separated = make_export(out)
    return out, v, separated


@pytest.fixture(scope="module")
def generator(export):
    return Generator(export[0], device="cpu")


@pytest.fixture(scope="module")
def problems():
    return load_benchmark("humaneval")[:3]


def test_modality_map(tmp_path, export):
    _, v, separated = export
    mmap = ModalityMap.read(export[0], v + len(separated))
    assert mmap.base_vocab_size == v and mmap.separated_ids == tuple(separated)
    s0, s5 = separated[0], separated[5]
    text_id = next(i for i in range(v) if i not in separated)
    # text-modality s0 keeps its id; code-modality separated ids go to V + slot; others stay
    assert mmap.route([s0, s0, text_id, s5], [0, 1, 1, 1]) == [s0, v, text_id, v + 5]
    assert mmap.to_base([v, v + 5, 3]) == [s0, s5, 3]
    assert ModalityMap.read(tmp_path, 100) == ModalityMap("none", 100, ())
    (tmp_path / "modality_map.json").write_text(
        '{"separation": "partial", "base_vocab_size": 10, "separated_ids": [1]}'
    )
    with pytest.raises(ValueError, match="vocabulary"):
        ModalityMap.read(tmp_path, 50)


def test_code_view_and_block_end_units():
    scores = torch.zeros(2, 6)
    out = CodeView([1, 4])(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.isinf(out[:, [1, 4]]).all() and (out[:, [0, 2, 3, 5]] == 0).all()
    eot, ind, ded = 9, 7, 8
    stop = BlockEnd(prompt_len=2, start_depth=[0, 1, 0], eot_id=eot, indent_id=ind, dedent_id=ded)
    ids = torch.tensor(
        [
            [1, 1, 7, 5, 8],  # opened a block and closed it: back at top level
            [1, 1, 5, 5, 8],  # started inside a block (sub-task), dedent to top level
            [1, 1, 7, 7, 8],
        ]
    )  # still one level deep
    assert stop(ids, None).tolist() == [True, True, False]
    assert BlockEnd(2, [0], eot, ind, ded)(torch.tensor([[1, 1, 9]]), None).tolist() == [True]


def test_prompts_route_code_tokens_and_output_uses_code_view(generator, export, problems):
    """Capture what the model is fed: the prompt's code tokens arrive as V + i, text tokens as
    themselves, and no generated token is ever a separated base id."""
    _, v, separated = export
    fed = []
    handle = generator.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append((kwargs["input_ids"].clone(), kwargs.get("attention_mask"))),
        with_kwargs=True,
    )
    try:
        generator.complete(problems, GREEDY)
    finally:
        handle.remove()
    first, mask = fed[0]
    slot = {x: i for i, x in enumerate(separated)}
    for row, problem in enumerate(problems):
        ids, modality = encode_prompt(generator.tokenizer, problem.signature_lin, problem.docstring)
        expected = [v + slot[x] if m == 1 and x in slot else x for x, m in zip(ids, modality)]
        fed_row = first[row][mask[row].bool()].tolist()
        assert fed_row == expected
        assert any(x >= v for x in fed_row)  # the signature really used code rows
        assert all(x < v for x, m in zip(fed_row, modality) if m == 0)
    generated = set(torch.cat([ids for ids, _ in fed[1:]], dim=1).flatten().tolist())
    assert not generated & set(separated)
    assert any(x >= v for x in generated)  # code tokens came out through their code rows


def test_code_view_matches_plain_transformers_when_code_table_is_a_copy(tmp_path, problems):
    """With C = E[separated], routing is invisible and the code view's pick V + i is the text
    view's pick s: mapped back, our tokens equal transformers' plain greedy decoding (text view)."""
    v, _ = make_export(tmp_path, copy_code_rows=True)
    ours = Generator(tmp_path, device="cpu")
    ours.model.double()
    results = ours.complete(problems, Settings(greedy=True, max_new_tokens=16))

    class TextView(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, v:] = -float("inf")
            return scores

    plain = GPTNeoForCausalLM.from_pretrained(tmp_path).double().eval()
    used_code_rows = 0
    for problem, (_, kept) in zip(problems, results):
        ids, _ = encode_prompt(ours.tokenizer, problem.signature_lin, problem.docstring)
        out = plain.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=16,
            logits_processor=LogitsProcessorList([TextView()]),
            pad_token_id=ours.tokenizer.pad_token_id,
            eos_token_id=None,
        )
        reference = out[0, len(ids) :].tolist()
        assert ours.mmap.to_base(kept) == reference[: len(kept)]
        used_code_rows += sum(x >= v for x in kept)
    assert used_code_rows > 0


def test_batched_left_padding_matches_one_at_a_time(generator, problems):
    together = generator.complete(problems, GREEDY)
    alone = [generator.complete([p], GREEDY)[0] for p in problems]
    assert together == alone


def test_incremental_prompt_continues_after_given_lines(generator, export):
    problem = load_benchmark("humaneval")[0]
    sub = subtasks(problem)[1]
    ids, depth = prompt_ids(sub, generator.tokenizer, generator.mmap)
    base_ids, _ = prompt_ids(problem, generator.tokenizer, generator.mmap)
    assert ids[: len(base_ids)] == base_ids and len(ids) > len(base_ids)
    assert depth == 2  # inside the two nested for-loops
    completion, _ = generator.complete([sub], GREEDY)[0]
    assert isinstance(completion, str)


def test_resume_appends_only_missing_samples(generator, tmp_path):
    problems = load_problems(ASSETS / "eval" / "humaneval_3.jsonl")[:2]
    samples = tmp_path / "samples.jsonl"
    settings = Settings(n=2, temperature=0.8, top_p=0.95, max_new_tokens=8, batch_size=3)
    assert generate_samples(generator, problems, settings, samples) == 4
    lines = samples.read_text().splitlines()
    samples.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # interrupted mid-line
    assert generate_samples(generator, problems, settings, samples) == 3
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert samples.read_text().splitlines()[0] == lines[0]
    assert sorted((r["task_id"], r["index"]) for r in records) == [
        ("HumanEval/0", 0),
        ("HumanEval/0", 1),
        ("HumanEval/2", 0),
        ("HumanEval/2", 1),
    ]
    assert generate_samples(generator, problems, settings, samples) == 0


def test_cli_humaneval_end_to_end(export, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DS_TRAIN_ALLOW_CODE_EXECUTION", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(
        [
            "humaneval",
            "--model",
            str(export[0]),
            "--limit",
            "5",
            "--greedy",
            "--max-new-tokens",
            "32",
            "--out",
            str(out),
            "--workers",
            "2",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["problems"] == 5 and summary["samples"] == 5 and summary["pass@1"] == 0.0
    assert set(summary["per_problem"]) == {f"HumanEval/{i}" for i in range(5)}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["task_id"], s["index"]) for s in samples] == [(f"HumanEval/{i}", 0) for i in range(5)]
    results = [json.loads(line) for line in (out / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == [s["task_id"] for s in samples]
    assert all(r["passed"] is False and isinstance(r["result"], str) for r in results)
    assert json.loads((out / "report.json").read_text())["samples"] == 5


def test_decoding_path_turns_code_view_ids_of_canonical_solutions_into_passing_programs(generator, export):
    """Feed each canonical HumanEval body (and, for the first 20 problems, the rest of the body
    after each incremental sub-task's given lines), tokenized and written with code-view ids
    (V + i), through the generator's decoding path (stop at the closing dedent, map back, decode,
    delinearize): every program passes its tests."""
    from eval.problems import reference_lin
    from eval.sandbox import Limits, run_many

    _, v, separated = export
    slot = {x: i for i, x in enumerate(separated)}
    base = load_benchmark("humaneval")
    by_id = {p.task_id: p for p in base}
    tasks = base + [sub for problem in base[:20] for sub in subtasks(problem)]
    junk = generator.tokenizer.encode("x = 1 <NEW_LINE>", add_special_tokens=False)  # after the stop
    jobs = []
    for task in tasks:
        full = reference_lin(by_id[task.base_id or task.task_id]).split()
        rest = full[len(task.given_lin.split()) :]
        ids = generator.tokenizer.encode(" ".join(rest), add_special_tokens=False)
        code_view = [v + slot[x] if x in slot else x for x in ids]
        _, depth = prompt_ids(task, generator.tokenizer, generator.mmap)
        completion, kept = generator.completion(task, code_view + junk, depth)
        assert kept == code_view
        jobs.append((task.prompt + completion, task.test, task.check))
    assert len(tasks) > 164 + 40
    outcomes = run_many(jobs, Limits(timeout=10), workers=4)
    assert {t.task_id: o.result for t, o in zip(tasks, outcomes) if not o.passed} == {}


def test_long_prompts_fit_the_context(tmp_path):
    """A model of 64 positions still completes a ~100-token prompt, within its context."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        intermediate_size=32,
    )
    GPTNeoForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # no modality_map.json: separation none
    generator = Generator(tmp_path, device="cpu")
    assert generator.mmap == ModalityMap("none", len(tokenizer), ())
    problem = load_benchmark("humaneval")[0]
    assert len(prompt_ids(problem, generator.tokenizer, generator.mmap)[0]) > 64
    fed = []
    handle = generator.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        [(_, kept)] = generator.complete([problem], Settings(greedy=True, max_new_tokens=100))
    finally:
        handle.remove()
    assert fed[0][1] == 32 and 1 <= len(kept) <= 32


def test_settings_seed_top_k_max_length_and_the_prompt_field(generator, problems, tmp_path):
    """The same seed gives the same samples; top_k=1 is greedy; max_length bounds prompt plus
    generation per row; every sample line carries the exact text the model was given."""
    sampled = Settings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=2, seed=7)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    generate_samples(generator, problems, sampled, first)
    generate_samples(generator, problems, sampled, second)
    assert first.read_text() == second.read_text()
    runs = []
    for seed in (7, 7, 8):
        set_seed(seed)
        runs.append([kept for _, kept in generator.complete(problems, Settings(temperature=2.0, max_new_tokens=12))])
    assert runs[0] == runs[1] != runs[2]
    for record in map(json.loads, first.read_text().splitlines()):
        problem = next(p for p in problems if p.task_id == record["task_id"])
        ids, _ = prompt_ids(problem, generator.tokenizer, generator.mmap)
        assert record["prompt"] == generator.tokenizer.decode(generator.mmap.to_base(ids), skip_special_tokens=False)
        assert record["prompt"].startswith("<bot>") and record["prompt"].endswith("<python>")

    top1 = generator.complete(problems, Settings(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=10))
    greedy = generator.complete(problems, Settings(greedy=True, max_new_tokens=10))
    assert [kept for _, kept in top1] == [kept for _, kept in greedy]

    lengths = [len(generator.prompt(p)[0]) for p in problems]
    bounded = generator.complete(problems, Settings(greedy=True, max_length=max(lengths) + 5, max_new_tokens=1))
    unbounded = generator.complete(problems, Settings(greedy=True, max_new_tokens=200))
    for n, (_, kept), (_, free) in zip(lengths, bounded, unbounded, strict=True):
        assert len(kept) <= max(lengths) + 5 - n
        assert kept == free[: len(kept)]
        assert len(kept) == min(len(free), max(lengths) + 5 - n)
    # a prompt longer than max_length: an empty completion (logged), not a failed run
    [(completion, kept)] = generator.complete(problems[:1], Settings(greedy=True, max_length=5))
    assert kept == [] and isinstance(completion, str)
