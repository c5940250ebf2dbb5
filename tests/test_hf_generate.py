"""Plain `transformers` generation from an export (remote code) against the project's own generator.

A tiny model of `ds_train.model` is trained for a few steps on one function, so that greedy
generation writes it back; the export (`ds_train.hf.write_hf_dir`) is then used three ways:

- `AutoModelForCausalLM` / `pipeline("text-generation")` with `trust_remote_code=True`;
- `eval.generate.Generator` (a plain GPTNeoForCausalLM with the project's routing, code view and
  prefix prefill);
- `ds_train.model.GPTNeo` itself, with the training masks (the reference for the first step).
"""

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from ds_train import hf, hf_remote
from ds_train.data import codec, encode
from ds_train.data import tokenizer as tokenizer_module
from ds_train.data.codec import linearize
from ds_train.data.encode import encode_pair, encode_prompt
from ds_train.data.sources import Pair
from ds_train.data.tokenizer import load_tokenizer
from ds_train.model import GPTNeo, GPTNeoConfig
from eval.cli import main as eval_main
from eval.generate import Generator, Settings
from eval.problems import humaneval_problem

LR = 5e-3
ASSETS = Path(__file__).parent / "assets"
ROOT = Path(__file__).parent.parent
PROMPT = 'def add_two(first, second):\n    """Return the sum of first and second."""\n'
BODY = "    total = first + second\n    return total\n"


def train_tiny(objective: str, separation: str, steps: int = 200) -> GPTNeo:
    """A 2-layer model (one local layer with a window shorter than the prompt) fitted to PROMPT + BODY."""
    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    separated = json.loads((ASSETS / "tokenizer" / "separation.json").read_text())[separation]
    config = GPTNeoConfig.from_flavor(
        "tiny",
        vocab_size=len(tokenizer),
        separated_ids=separated,
        pad_token_id=tokenizer.pad_token_id,
        n_positions=128,
        window_size=6,
    )
    torch.manual_seed(0)
    model = GPTNeo(config)
    source = PROMPT.split('    """')[0] + BODY
    pair = Pair("p", "Return the sum of first and second.", linearize(source))
    enc = encode_pair(tokenizer, pair, objective)
    batch = {
        "input_ids": torch.tensor([enc.input_ids]),
        "modality": torch.tensor([enc.modality]).bool(),
        "target": torch.tensor([enc.target]).bool(),
        "prefix": torch.tensor([enc.prefix]).bool(),
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(steps):
        loss, _ = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def export(model: GPTNeo, out: Path, separation: str, objective: str) -> Path:
    out.mkdir()
    hf.write_hf_dir(
        out,
        model.config,
        model.state_dict(),
        ASSETS / "tokenizer",
        separation=separation,
        objective=objective,
    )
    return out


CASES = [("none", "code_clm"), ("partial", "code_clm"), ("full", "code_clm"), ("partial", "prefix_code_clm")]


_EXPORTS: dict = {}


def _case(separation: str, objective: str, tmp_path_factory) -> tuple[GPTNeo, Path, str, str]:
    """The trained model and its export, made once per module for each case."""
    if (separation, objective) not in _EXPORTS:
        model = train_tiny(objective, separation)
        out = export(model, tmp_path_factory.mktemp("export") / "model", separation, objective)
        _EXPORTS[separation, objective] = (model, out, separation, objective)
    return _EXPORTS[separation, objective]


@pytest.fixture(params=CASES, ids=[f"{s}-{o}" for s, o in CASES])
def case(request, tmp_path_factory):
    return _case(*request.param, tmp_path_factory)


def test_remote_generation_equals_the_project_generator(case):
    model, out, separation, objective = case
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert tokenizer.eos_token == "<eot>" and tokenizer.model_max_length == model.config.n_positions
    mmap = hf.ModalityMap.read(out)
    assert (mmap.separation, mmap.objective, mmap.prefix_lm) == (
        separation,
        objective,
        objective == "prefix_code_clm",
    )

    problem = humaneval_problem({"task_id": "t/0", "prompt": PROMPT, "entry_point": "add_two", "test": ""})
    base = load_tokenizer(ASSETS / "tokenizer")
    expected_prompt, _ = encode_prompt(base, problem.signature_lin, problem.docstring)
    encoded = tokenizer(PROMPT, return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == expected_prompt  # the training layout, tokenized as trained

    out_ids = remote.generate(**encoded, do_sample=False, max_new_tokens=40)
    remote_new = out_ids[0, encoded["input_ids"].shape[1] :].tolist()

    generator = Generator(out, device="cpu")
    completion, kept = generator.complete([problem], Settings(greedy=True, max_new_tokens=40))[0]
    ours = generator.mmap.to_base(kept)
    assert len(ours) > 5
    assert remote_new[: len(ours)] == ours
    if separation != "none":
        assert any(x >= mmap.base_vocab_size for x in kept)  # the project's side really used code rows

    text = tokenizer.decode(remote_new)
    assert text == completion == BODY
    ast.parse(PROMPT + text)

    generate = pipeline("text-generation", model=str(out), trust_remote_code=True, device="cpu")
    full = generate(PROMPT, do_sample=False, max_new_tokens=40)[0]["generated_text"]
    assert full == PROMPT + BODY
    ast.parse(full)


def test_prefix_logits_equal_the_training_model(case):
    """The first generated token's logits: remote code and the project's generator equal
    ds_train.model under the training masks (the prefix bidirectional for Prefix Code CLM)."""
    model, out, _, objective = case
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    base = load_tokenizer(ASSETS / "tokenizer")
    problem = humaneval_problem({"task_id": "t/0", "prompt": PROMPT, "entry_point": "add_two", "test": ""})
    _, modality = encode_prompt(base, problem.signature_lin, problem.docstring)
    prefix = torch.ones_like(ids, dtype=torch.bool) if objective == "prefix_code_clm" else None
    with torch.no_grad():
        reference = model.double().logits(
            ids, modality=torch.tensor([modality]).bool(), prefix=prefix, code_view=True
        )
        model.float()
        got = remote.double()(ids).logits
        causal = model.double().logits(ids, modality=torch.tensor([modality]).bool(), code_view=True)
        model.float()
    torch.testing.assert_close(got[0, -1], reference[0, -1], rtol=1e-6, atol=1e-6)
    if (
        objective == "prefix_code_clm"
    ):  # the prefix changes the numbers: a causal read is not the trained model
        assert (causal[0, -1] - reference[0, -1]).abs().max() > 1e-3

    generator = Generator(out, device="cpu")
    generator.model.double()
    scores = _first_scores(generator, problem)
    V = generator.mmap.base_vocab_size
    view = scores[:V].clone()  # the project's view: code rows in columns V + i, base columns of S forbidden
    if generator.mmap.separated_ids:
        view[list(generator.mmap.separated_ids)] = scores[V:]
    torch.testing.assert_close(view, reference[0, -1], rtol=1e-6, atol=1e-6)


def _first_scores(generator: Generator, problem) -> torch.Tensor:
    """Raw logits of the project generator's first step (model ids)."""
    captured = []

    def keep(module, args, kwargs, output):
        captured.append(output.logits[0, -1].detach())

    handle = generator.model.register_forward_hook(keep, with_kwargs=True)
    try:
        generator.complete([problem], Settings(greedy=True, max_new_tokens=1))
    finally:
        handle.remove()
    return captured[0]


def test_export_loads_without_ds_train(tmp_path_factory, tmp_path):
    """The directory is self-contained: a fresh interpreter that cannot import ds_train generates."""
    _, out, _, _ = _case("partial", "prefix_code_clm", tmp_path_factory)
    script = f"""
import sys
sys.modules["ds_train"] = None  # any import of ds_train fails
from transformers import pipeline
g = pipeline("text-generation", model={str(out)!r}, trust_remote_code=True, device="cpu")
print(g({PROMPT!r}, do_sample=False, max_new_tokens=40)[0]["generated_text"], end="")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == PROMPT + BODY


def test_ds_eval_generate_prints_the_completed_function(tmp_path_factory, capsys, monkeypatch):
    _, out, _, _ = _case("partial", "prefix_code_clm", tmp_path_factory)
    assert eval_main(["generate", "--model", str(out), "--prompt", PROMPT, "--greedy"]) == 0
    assert capsys.readouterr().out == PROMPT + BODY
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    assert (
        eval_main(["generate", "--model", str(out), "--prompt", "-", "--greedy", "--max-length", "60"]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith(PROMPT) and len(printed) > len(PROMPT)
    assert eval_main(["generate", "--model", str(out), "--prompt", "x = 1"]) == 2
    assert capsys.readouterr().err.strip() == "ds-eval generate: the prompt defines no top-level function"


def test_batched_left_padded_generation_equals_one_at_a_time(tmp_path_factory):
    """Two prompts of different lengths in one left-padded batch (the prefix mask per row) give the
    tokens each gives alone, through the remote code and through the project's generator."""
    _, out, _, _ = _case("partial", "prefix_code_clm", tmp_path_factory)
    other = 'def add_two(first, second):\n    """Return the sum of first and second, as a number."""\n'
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True, padding_side="left")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    batch = tokenizer([PROMPT, other], return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # really padded
    together = remote.generate(**batch, do_sample=False, max_new_tokens=20)[:, batch["input_ids"].shape[1] :]
    for row, prompt in enumerate([PROMPT, other]):
        alone = tokenizer(prompt, return_tensors="pt")
        single = remote.generate(**alone, do_sample=False, max_new_tokens=20)[
            0, alone["input_ids"].shape[1] :
        ]
        assert together[row].tolist()[: len(single)] == single.tolist()

    generator = Generator(out, device="cpu")
    problems = [
        humaneval_problem({"task_id": f"t/{i}", "prompt": p, "entry_point": "add_two", "test": ""})
        for i, p in enumerate([PROMPT, other])
    ]
    settings = Settings(greedy=True, max_new_tokens=20)
    assert generator.complete(problems, settings) == [generator.complete([p], settings)[0] for p in problems]


def test_the_remote_code_takes_its_layout_from_the_codec():
    """hf_remote.py runs without ds_train, so the export carries a copy of the codec beside it; the
    special tokens and the docstring rendering must come from there, not from copies in hf_remote."""
    for name in ("BOT", "COMMENTS", "PYTHON", "EOT", "PAD", "DOC_INDENT", "render_docstring", "delinearize"):
        assert getattr(hf_remote, name) is getattr(codec, name), name
    assert (tokenizer_module.EOT, tokenizer_module.PAD) == (codec.EOT, codec.PAD)
    for doc in ["One line.", "Two\nlines.\n  indented", 'Has """ quotes', ""]:
        assert hf_remote.render_docstring(doc) == encode.render_docstring(doc)
