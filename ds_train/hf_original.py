"""The original implementation's model format, read for `ds_train.hf.convert_original`.

`lm_trainer.py` of the original implementation separates embeddings by *extending the vocabulary*:
for each token to separate (sorted by its string) that the tokenizer has, it adds a token
`[_DUP_]TOKEN` and maps the old id to the new one; a token it lacks is added twice, as `TOKEN`
and `[_DUP_]TOKEN`, the first id mapped to the second. The model's table is resized to the new
vocabulary and each duplicate row starts as a copy of its source; `replicated_tokens_map.pkl`
(written by `sample_concatenation.py`) holds the map {text id: duplicate id}. `generation.py` feeds
code tokens of the prompt through the map and strips `[_DUP_]` from the output.

Ours is [E; C]: the V text ids first (the original's vocabulary without the duplicates, in order),
then one code row per separated id, in the order of the ids. This module plans that renumbering,
builds the table and rewrites the tokenizer files; it needs nothing of `transformers`.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_train.errors import UsageError, first_line

TOKENS_MAP = "replicated_tokens_map.pkl"
DUP_PREFIX = "[_DUP_]"
RENAMED = {"<|beginoftext|>": "<bot>"}
"""Tokens of the original (PyCodeGPT's names) that this project knows by another name."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _IntsOnly(pickle.Unpickler):
    """A map of ints needs no class: any global in the pickle is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_tokens_map(path: str | Path) -> dict[int, int]:
    """{text id: duplicate id} from `replicated_tokens_map.pkl` (or a JSON object of the same)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"{path}: no replicated-tokens map (the original saves {TOKENS_MAP} beside its data)"
        )
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else _IntsOnly(io.BytesIO(raw)).load()
        mapping = {int(k): int(v) for k, v in dict(data).items()}
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, TypeError, ValueError) as err:
        raise UsageError(f"{path}: not a map of token ids ({first_line(err)})") from None
    if len(set(mapping.values())) != len(mapping) or set(mapping) & set(mapping.values()):
        raise UsageError(f"{path}: duplicate ids must be distinct and never a source id")
    return mapping


@dataclass(frozen=True)
class Renumbering:
    """Where each row of the original's table goes in [E; C]."""

    kept: list[int]
    """The original ids of the text rows, in order: new id i is old id kept[i]."""
    code_rows: list[int]
    """The original (duplicate) row of each code row, in the order of `separated_ids`."""
    separated_ids: list[int]
    """S in new ids, sorted."""

    @property
    def vocab_size(self) -> int:
        return len(self.kept)

    def new_id(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}


def renumbering(mapping: dict[int, int], rows: int) -> Renumbering:
    """The plan for a table of `rows` rows under the original's `mapping`."""
    if any(not 0 <= i < rows for pair in mapping.items() for i in pair):
        raise UsageError(f"the replicated-tokens map names ids outside the model's {rows} rows")
    duplicates = set(mapping.values())
    kept = [i for i in range(rows) if i not in duplicates]
    new = {old: n for n, old in enumerate(kept)}
    pairs = sorted((new[text], dup) for text, dup in mapping.items())
    return Renumbering(kept, [dup for _, dup in pairs], [s for s, _ in pairs])


def convert_table(table: torch.Tensor, plan: Renumbering) -> torch.Tensor:
    """The original's (rows, d) table -> our (V + |S|, d) table [E; C]."""
    return torch.cat([table[plan.kept], table[plan.code_rows]]).contiguous()


def rewrite_tokenizer(src: Path, dst: Path, plan: Renumbering) -> None:
    """Copy the tokenizer files of `src` into `dst` without the `[_DUP_]` tokens, every other added
    token renumbered to its new id, PyCodeGPT's names of special tokens renamed to ours, and
    `<pad>` as the pad token."""
    if not (src / "tokenizer.json").is_file():
        raise UsageError(f"{src}: no tokenizer.json (save the original's tokenizer with a fast tokenizer)")
    dst.mkdir(parents=True, exist_ok=True)
    new = plan.new_id()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    tok = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    present = {t["content"] for t in tok.get("added_tokens", [])}
    added = []
    for entry in tok.get("added_tokens", []):
        if entry["content"].startswith(DUP_PREFIX):
            continue
        if entry["id"] not in new:
            raise UsageError(f"{src}: added token {entry['content']!r} has a duplicate's id {entry['id']}")
        renamed = RENAMED.get(entry["content"])
        added.append(
            {
                **entry,
                "id": new[entry["id"]],
                **({"content": renamed} if renamed and renamed not in present else {}),
            }
        )
    tok["added_tokens"] = added
    vocab = tok.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and any(v in set(plan.code_rows) for v in vocab.values()):
        raise UsageError(f"{src}: a duplicate id lies inside the base vocabulary")
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    decoder = config.pop("added_tokens_decoder", None)
    if decoder:
        config["added_tokens_decoder"] = {
            str(new[int(i)]): {**e, "content": RENAMED.get(e["content"], e["content"])}
            for i, e in decoder.items()
            if not e["content"].startswith(DUP_PREFIX)
        }
    config["pad_token"] = "<pad>"
    for key in ("bos_token", "eos_token", "auto_map"):
        config.pop(key, None)
    config["tokenizer_class"] = "TokenizersBackend"  # read tokenizer.json as it is
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (dst / "special_tokens_map.json").unlink(missing_ok=True)
