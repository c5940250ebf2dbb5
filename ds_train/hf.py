"""Everything `transformers`: config.json, key maps, weights, tokenizer, modality_map.json, export dirs.

An export directory (ARCHITECTURE.md "Exports") is a GPTNeoForCausalLM whose token table is
[E; C] (vocab_size V + |S|), plus:

- `modality_map.json` (`ModalityMap`): the separation, V, the separated ids S, the training
  objective and whether the prompt prefix attends bidirectionally (Prefix Code CLM);
- the tokenizer with `<eot>` as its end token, the model's context as `model_max_length` and one
  added token `<code:PIECE>` per code row, so every id of the table decodes;
- remote code (`ds_train/hf_remote.py`, copied in as
  `modeling_mrpt.py`, with `ds_train/data/codec.py` beside it as `mrpt_codec.py`) that
  `trust_remote_code=True` loads through config.json's `auto_map`: it routes prompt code tokens to
  their code rows, applies the code view, attends bidirectionally inside a Prefix Code CLM prompt,
  and its tokenizer turns a Python prompt into the training layout and decodes to Python source.
  Without `trust_remote_code` the directory loads as a plain GPTNeoForCausalLM (exact for separation
  none and a causal objective).

`ds_train.model` is the model alone; this module maps it to and from `transformers`' layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AddedToken, GenerationConfig

from ds_train import hf_original
from ds_train.data import codec
from ds_train.data.tokenizer import EOT, PAD, SPECIAL_TOKENS, load_tokenizer
from ds_train.errors import UsageError, first_line
from ds_train.fileio import replacing_dir
from ds_train.model import GPTNeo, GPTNeoConfig

log = logging.getLogger(__name__)

MODALITY_MAP = "modality_map.json"
WEIGHTS = "model.safetensors"
REMOTE_MODEL = "modeling_mrpt.py"
REMOTE_CODEC = "mrpt_codec.py"
_REMOTE_SOURCE = Path(__file__).with_name("hf_remote.py")
PREFIX_OBJECTIVE = "prefix_code_clm"


# ----------------------------------------------------------------------------------------------------
# modality_map.json
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalityMap:
    """The separated ids of an export, the routing they imply, and how the model was trained."""

    separation: str
    """none, partial, full (or custom for a converted model)."""
    base_vocab_size: int
    """V: the tokenizer's vocabulary before the code rows; code row i has id V + i."""
    separated_ids: tuple[int, ...]
    """S: sorted token ids that have a code row."""
    objective: str = "code_clm"
    """The training objective (`unknown` for a model converted from elsewhere)."""
    prefix_lm: bool = False
    """The prompt (`<bot>` ... `<python>`) attends bidirectionally, as Prefix Code CLM trains it."""

    @classmethod
    def plain(cls, vocab_size: int) -> ModalityMap:
        """A model without code rows (separation none)."""
        return cls("none", vocab_size, ())

    @classmethod
    def read(cls, model_dir: str | Path, vocab_size: int | None = None) -> ModalityMap:
        """Read `modality_map.json`; without it a plain model of `vocab_size` (an error if that is None).

        With `vocab_size` (the model's table rows) the map must account for every row.
        """
        path = Path(model_dir) / MODALITY_MAP
        if not path.is_file():
            if vocab_size is None:
                raise UsageError(f"{model_dir} has no {MODALITY_MAP}")
            return cls.plain(vocab_size)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            mmap = cls(
                str(raw["separation"]),
                int(raw["base_vocab_size"]),
                tuple(int(i) for i in raw["separated_ids"]),
                str(raw.get("objective", "code_clm")),
                bool(raw.get("prefix_lm", raw.get("objective") == PREFIX_OBJECTIVE)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UsageError(f"{path}: not a modality map ({first_line(err)})") from None
        if vocab_size is not None and mmap.base_vocab_size + len(mmap.separated_ids) != vocab_size:
            raise UsageError(
                f"{path}: base_vocab_size {mmap.base_vocab_size} + {len(mmap.separated_ids)} "
                f"separated ids != the model's vocabulary {vocab_size}"
            )
        if any(not 0 <= i < mmap.base_vocab_size for i in mmap.separated_ids):
            raise UsageError(f"{path}: a separated id lies outside the base vocabulary")
        return mmap

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "separated_ids": list(self.separated_ids)}

    def write(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / MODALITY_MAP
        path.write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")
        return path

    def route(self, ids: list[int], modality: list[int]) -> list[int]:
        """Model input ids: code tokens that are separated go to their code rows V + i."""
        slot = {x: i for i, x in enumerate(self.separated_ids)}
        return [
            self.base_vocab_size + slot[x] if m and x in slot else x
            for x, m in zip(ids, modality, strict=True)
        ]

    def to_base(self, ids: list[int]) -> list[int]:
        """Model ids -> tokenizer ids (V + i back to separated_ids[i])."""
        v = self.base_vocab_size
        return [self.separated_ids[x - v] if x >= v else x for x in ids]


# ----------------------------------------------------------------------------------------------------
# State-dict keys: ours <-> GPTNeoForCausalLM's
# ----------------------------------------------------------------------------------------------------

_HF_ATTN = re.compile(r"^h\.(\d+)\.attn\.")
_HF_OWN_ATTN = re.compile(r"^h\.(\d+)\.attn\.attention\.")
_HF_IGNORED = re.compile(r"(\.attn\.attention\.(bias|masked_bias)$)|(^lm_head\.weight$)")


def _expected_shapes(config: GPTNeoConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of GPTNeo(config), without allocating it."""
    with torch.device("meta"):
        return {name: p.shape for name, p in GPTNeo(config).state_dict().items()}


def _check_keys(state_dict: dict[str, Tensor], config: GPTNeoConfig, what: str) -> None:
    """One-line UsageError if `state_dict` lacks a parameter, has a stray one, or a wrong shape."""
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in state_dict and state_dict[k].shape != s
    ]
    problems = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected}"] * bool(unexpected)
    problems += [f"shape {w}" for w in wrong]
    if problems:
        raise UsageError(f"{what} does not match the model config: " + "; ".join(problems))


def to_hf_state_dict(state_dict: dict[str, Tensor], config: GPTNeoConfig) -> dict[str, Tensor]:
    """Our parameter names -> GPTNeoForCausalLM's; `lm_head.weight` is the same tensor as the table [E; C]."""
    _check_keys(state_dict, config, "state dict")
    hf = {"transformer." + _HF_ATTN.sub(r"h.\1.attn.attention.", k): v for k, v in state_dict.items()}
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    return hf


def from_hf_state_dict(
    hf_state_dict: dict[str, Tensor], config: GPTNeoConfig, *, seed: int = 0
) -> dict[str, Tensor]:
    """GPTNeoForCausalLM weights -> our state dict for `config`.

    The token table may have V_hf <= V rows (a plain GPT-Neo; rows V_hf..V-1 are tokens the tokenizer
    added, drawn from normal(0, init_std) with `seed`; the code rows start as copies of E's rows of the
    separated ids; the pad row is zeroed) or exactly V + |S| rows (an export of this project, kept as is).
    An untied `lm_head.weight` is an error: the head must be the token table.
    """
    ours = {}
    for key, value in hf_state_dict.items():
        if _HF_IGNORED.search(key):
            continue
        ours[_HF_OWN_ATTN.sub(r"h.\1.attn.", key.removeprefix("transformer."))] = value
    head = hf_state_dict.get("lm_head.weight")
    table = hf_state_dict.get("transformer.wte.weight")
    if head is not None and table is not None and not torch.equal(head, table):
        raise UsageError("lm_head.weight differs from transformer.wte.weight: only a tied head is supported")
    if table is not None:
        ours["wte.weight"] = _full_token_table(table, config, seed)
    _check_keys(ours, config, "checkpoint")
    return ours


def _full_token_table(table: Tensor, config: GPTNeoConfig, seed: int) -> Tensor:
    """A checkpoint's token table (V_hf <= V rows, or V + |S|) -> the (V + |S|, d) table [E; C]."""
    V, n_sep = config.vocab_size, config.n_separated
    rows = table.shape[0]
    if rows == V + n_sep:
        return table.clone()
    if rows > V:
        raise UsageError(
            f"checkpoint token table has {rows} rows; expected at most V = {V} or exactly V + |S| = {V + n_sep}"
        )
    full = torch.empty(V + n_sep, table.shape[1], dtype=table.dtype)
    full[:rows] = table
    generator = torch.Generator().manual_seed(seed)
    full[rows:V] = (torch.randn(V - rows, table.shape[1], generator=generator) * config.init_std).to(
        table.dtype
    )
    full[V:] = full[torch.tensor(config.separated_ids, dtype=torch.long)]
    if config.pad_token_id is not None:
        full[config.pad_token_id] = 0.0
    return full


# ----------------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------------


def _attention_types_hf(types: tuple[str, ...]) -> list:
    """Per-layer types -> GPT-Neo's [[pattern, repeats]] form, with the shortest repeating pattern."""
    n = len(types)
    period = next(p for p in range(1, n + 1) if n % p == 0 and types == types[:p] * (n // p))
    return [[list(types[:period]), n // period]]


def hf_config_dict(config: GPTNeoConfig) -> dict[str, Any]:
    """The `config.json` content of GPTNeoForCausalLM for this model; vocab_size = V + |S|."""
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": config.vocab_size + config.n_separated,
        "max_position_embeddings": config.n_positions,
        "hidden_size": config.d_model,
        "num_layers": config.n_layer,
        "num_heads": config.n_head,
        "attention_types": _attention_types_hf(config.attention_types),
        "window_size": config.window_size,
        "intermediate_size": None,
        "activation_function": "gelu_new",
        "resid_dropout": 0.0,
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": True,
    }


def config_from_hf_dir(path: str | Path) -> dict[str, Any]:
    """GPTNeoConfig fields read from a `transformers` directory's config.json (+ modality_map.json)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{path} has no config.json: not a transformers model directory")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{config_file}: unreadable ({first_line(err)})") from None
    if hf.get("model_type") != "gpt_neo":
        raise UsageError(f"{config_file}: model_type is {hf.get('model_type')!r}, expected 'gpt_neo'")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UsageError(f"{config_file}: activation {hf['activation_function']!r} is not GELU (tanh)")
    if hf.get("intermediate_size") not in (None, 4 * hf["hidden_size"]):
        raise UsageError(f"{config_file}: intermediate_size {hf['intermediate_size']} is not 4 x hidden_size")
    types = [
        t
        for pattern, repeats in hf.get("attention_types", [[["global", "local"], 12]])
        for t in pattern * repeats
    ]
    fields = {
        "vocab_size": hf["vocab_size"],
        "n_positions": hf["max_position_embeddings"],
        "d_model": hf["hidden_size"],
        "n_layer": hf["num_layers"],
        "n_head": hf["num_heads"],
        "window_size": hf.get("window_size", 256),
        "attention_types": tuple(types),
        "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "init_std": hf.get("initializer_range", 0.02),
        "pad_token_id": hf.get("pad_token_id"),
    }
    if (path / MODALITY_MAP).is_file():
        mmap = ModalityMap.read(path)
        fields["vocab_size"] = mmap.base_vocab_size
        fields["separated_ids"] = mmap.separated_ids
    return fields


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors (single or sharded) or pytorch_model.bin in `path`."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return load_file(path / WEIGHTS)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(path / shard).items()}
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UsageError(f"{path} has no {WEIGHTS}, model.safetensors.index.json or pytorch_model.bin")


def save_weights(state_dict: dict[str, Tensor], config: GPTNeoConfig, out_dir: str | Path) -> int:
    """Our state dict -> `out_dir/model.safetensors` in GPTNeoForCausalLM's keys, without the tied head
    (`transformers` ties it to the token table on load). Returns the number of parameters written."""
    hf = to_hf_state_dict(state_dict, config)
    del hf["lm_head.weight"]
    tensors = {k: v.contiguous() for k, v in hf.items()}
    save_file(tensors, str(Path(out_dir) / WEIGHTS), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def load_model(path: str | Path, **config_overrides: Any) -> GPTNeo:
    """The project's model from a local `transformers` GPT-Neo directory (plain, or an export).

    The config comes from config.json (and modality_map.json, when present), then `config_overrides`
    (e.g. vocab_size=V and separated_ids=S of a tokenizer with added tokens).
    """
    path = Path(path)
    try:
        config = GPTNeoConfig.from_dict({**config_from_hf_dir(path), **config_overrides})
        config.validate()
    except (TypeError, ValueError) as err:
        raise UsageError(f"{path}: {first_line(err)}") from None
    model = GPTNeo(config)
    model.load_state_dict(from_hf_state_dict(read_weights(path), config))
    log.info("loaded %s: %d parameters, |S| = %d", path, model.num_params(), config.n_separated)
    return model


# ----------------------------------------------------------------------------------------------------
# Tokenizer and the whole directory
# ----------------------------------------------------------------------------------------------------


def write_tokenizer(
    tokenizer_dir: str | Path, separated: list[int], out_dir: Path, max_length: int
) -> dict[str, int]:
    """Save the tokenizer with `<eot>` as its end token, `max_length` as `model_max_length`, and one
    added token `<code:PIECE>` per separated id (ids V .. V+|S|-1, in order), so every id of the
    exported table decodes. Returns the ids of V (`vocab`), `<eot>` and `<pad>`."""
    tokenizer = load_tokenizer(tokenizer_dir, check_separation=False)
    vocab_size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(separated))
    tokenizer.add_tokens([AddedToken(f"<code:{p}>", special=False, normalized=False) for p in pieces])
    got = tokenizer.convert_tokens_to_ids([f"<code:{p}>" for p in pieces])
    if got != list(range(vocab_size, vocab_size + len(separated))):
        raise UsageError(f"{tokenizer_dir}: the code tokens did not get ids {vocab_size}..: a name is taken")
    tokenizer.eos_token = EOT
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)
    return {
        "vocab": vocab_size,
        EOT: tokenizer.convert_tokens_to_ids(EOT),
        PAD: tokenizer.convert_tokens_to_ids(PAD),
    }


def _add_remote_code(
    out_dir: Path, hf_config: dict[str, Any], mmap: ModalityMap, special: dict[str, int]
) -> None:
    """Copy the remote model/tokenizer code and the codec beside it; register them in `auto_map`."""
    shutil.copyfile(_REMOTE_SOURCE, out_dir / REMOTE_MODEL)
    shutil.copyfile(codec.__file__, out_dir / REMOTE_CODEC)
    module = REMOTE_MODEL.removesuffix(".py")
    hf_config["architectures"] = ["MRPTForCausalLM"]
    hf_config["auto_map"] = {"AutoModelForCausalLM": f"{module}.MRPTForCausalLM"}
    hf_config["mrpt"] = {**mmap.to_dict(), "special_ids": special}
    tok_file = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, f"{module}.MRPTTokenizer"]}
    tok_config["tokenizer_class"] = "MRPTTokenizer"
    tok_config["mrpt_base_vocab_size"] = mmap.base_vocab_size
    tok_config["mrpt_separated_ids"] = list(mmap.separated_ids)
    tok_file.write_text(json.dumps(tok_config, indent=2) + "\n")


def write_hf_dir(
    out_dir: str | Path,
    config: GPTNeoConfig,
    state_dict: dict[str, Tensor],
    tokenizer_dir: str | Path,
    *,
    separation: str,
    objective: str,
) -> int:
    """Write a whole export into `out_dir` (which exists and is empty): weights, config.json,
    generation_config.json, tokenizer, modality_map.json and (when needed) the remote code.
    Returns the number of parameters written."""
    out_dir = Path(out_dir)
    ids = write_tokenizer(tokenizer_dir, list(config.separated_ids), out_dir, config.n_positions)
    if ids["vocab"] != config.vocab_size:
        raise UsageError(
            f"{tokenizer_dir}: the tokenizer has {ids['vocab']} tokens, the model V = {config.vocab_size}"
        )
    mmap = ModalityMap(
        separation, config.vocab_size, config.separated_ids, objective, objective == PREFIX_OBJECTIVE
    )
    n_params = save_weights(state_dict, config, out_dir)
    hf_config = {**hf_config_dict(config), "eos_token_id": ids[EOT], "pad_token_id": ids[PAD]}
    tokenizer = load_tokenizer(out_dir, check_separation=False)
    _add_remote_code(
        out_dir, hf_config, mmap, {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    )
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    GenerationConfig(eos_token_id=ids[EOT], pad_token_id=ids[PAD]).save_pretrained(out_dir)
    mmap.write(out_dir)
    return n_params


# ----------------------------------------------------------------------------------------------------
# The original implementation's format
# ----------------------------------------------------------------------------------------------------


def convert_original(
    src: str | Path, out: str | Path, *, tokens_map: str | Path | None = None, objective: str = "code_clm"
) -> ModalityMap:
    """A model directory in the original's format (vocabulary extended with `[_DUP_]` rows, and its
    `replicated_tokens_map.pkl`, in `src` unless `tokens_map` names it) -> an export of ours in `out`
    ([E; C], modality_map.json, remote code). `out` is an empty directory (written in place) or a new
    name (it appears only when complete). `objective` is the one the model was trained with
    (prefix_code_clm makes its prompt bidirectional)."""
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory")
    mapping = hf_original.read_tokens_map(tokens_map or src / hf_original.TOKENS_MAP)
    fields = config_from_hf_dir(src)
    weights = read_weights(src)
    table = weights.get("transformer.wte.weight")
    if table is None:
        raise UsageError(f"{src}: no transformer.wte.weight: not a GPT-Neo checkpoint")
    head = weights.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, table):
        raise UsageError(f"{src}: lm_head.weight differs from the token table: only a tied head is supported")
    plan = hf_original.renumbering(mapping, table.shape[0])
    with tempfile.TemporaryDirectory(prefix="ds_train-original-") as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        hf_original.rewrite_tokenizer(src, tokenizer_dir, plan)
        tokenizer = load_tokenizer(tokenizer_dir, check_separation=False)
        if len(tokenizer) != plan.vocab_size:
            raise UsageError(
                f"{src}: the tokenizer has {len(tokenizer)} tokens without duplicates, the table "
                f"{plan.vocab_size} text rows"
            )
        config = GPTNeoConfig.from_dict(
            {
                **fields,
                "vocab_size": plan.vocab_size,
                "separated_ids": tuple(plan.separated_ids),
                "pad_token_id": tokenizer.pad_token_id,
            }
        )
        weights["transformer.wte.weight"] = hf_original.convert_table(table, plan)
        state = from_hf_state_dict(weights, config)
        # an empty directory is written in place; a new name appears only when complete
        with (nullcontext(out) if out.exists() else replacing_dir(out)) as target:
            write_hf_dir(target, config, state, tokenizer_dir, separation="original", objective=objective)
    return ModalityMap.read(out)
