"""Whether an imported encoder can serve, judged before it is registered: it computes what our
encoder computes (BERT's layers, then mean pooling and normalisation), its tokenizer parses as
inference will parse it and fits the model's vocabulary, and its weights are floats that load
strictly into the module its config describes (built by the zoo, as inference builds it).
Errors name what is wrong, a few items at a time (a hostile file may hold thousands).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from maas import zoo
from maas.errors import FailedPrecondition, InvalidArgument
from maas.text.bert_config import BertConfig
from maas.text.tokenizer import TOKENIZER_FILE, TextTokenizer

ARCH = "bert"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Encoded once at import: words and scripts no English vocabulary holds whole.
UNSEEN_TEXT = "zqxjvw \u2603 \U0001d518\U0001d51e \u0e01\u0e02 qqqqzzzz"


def _short(text: str, most: int = 100) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def listed(items: Iterable[str], most: int = 5) -> str:
    """``a, b, c and 4 more``: the first few of a possibly long list."""
    items = list(items)
    shown = ", ".join(_short(item) for item in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


# The config.json values our encoder computes with. A checkpoint of the same tensor names that
# says otherwise (RoBERTa counts positions from 2, some encoders use the tanh GELU or relative
# positions) would import and serve, embedding differently from its own library: refused.
COMPUTED_AS = {
    "model_type": ("bert",),
    "hidden_act": ("gelu",),  # erf GELU, as torch's F.gelu
    "position_embedding_type": ("absolute",),
}
# The sentence-transformers modules our encoder reproduces; a Dense or any other stage after
# pooling would be silently dropped.
MODULE_TYPES = tuple(
    f"sentence_transformers.models.{kind}" for kind in ("Transformer", "Pooling", "Normalize")
)


def check_computation(config: Mapping[str, Any], where: str) -> None:
    """``config`` (config.json's object) asks for nothing our encoder computes differently."""
    for key, accepted in COMPUTED_AS.items():
        if key in config and config[key] not in accepted:
            raise InvalidArgument(
                f"{where}: {key}={_short(repr(config[key]))} is not what the platform's encoder "
                f"computes ({key} {' or '.join(map(repr, accepted))}); importing it would serve "
                "different embeddings than its own library"
            )


def check_sizes(config: Mapping[str, Any], from_shapes: Mapping[str, int], where: str) -> None:
    """The sizes ``config`` states agree with the weights' shapes (which the model is built
    from): a config.json of another checkpoint beside these weights is refused, not ignored."""
    differ = [
        f"{key}={_short(repr(config[key]))} (the weights have {size})"
        for key, size in from_shapes.items()
        if key in config and not (type(config[key]) is int and config[key] == size)
    ]
    if differ:
        raise InvalidArgument(f"{where} says {listed(differ)}: is it the config of these weights?")


def check_modules(modules: list[Any] | None, where: str) -> None:
    """``modules`` (modules.json's array) holds only stages our encoder reproduces."""
    if modules is None:
        return
    kinds = [m.get("type") if isinstance(m, dict) else m for m in modules]
    others = [repr(kind) for kind in kinds if kind not in MODULE_TYPES]
    if others:
        raise InvalidArgument(
            f"{where} lists {listed(others)}; the platform's encoder reproduces "
            f"{', '.join(MODULE_TYPES)} only, and would leave the others out"
        )


def check_tokenizer(files: Mapping[str, bytes], config: BertConfig, where: str) -> None:
    """The tokenizer must parse as inference will parse it, and every id it emits must have a
    row in the model's embedding table. ``where`` names the tokenizer's directory in errors."""
    try:
        tokenizer = TextTokenizer.from_files(
            files, max_length=config.max_seq_length, pad_id=config.pad_token_id
        )
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    try:  # words it has never seen: a vocabulary without its unknown token fails on them
        tokenizer.ids([UNSEEN_TEXT])
    except FailedPrecondition as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None
    if tokenizer.max_id >= config.vocab_size:
        raise InvalidArgument(
            f"{where}: {TOKENIZER_FILE} emits token ids up to {tokenizer.max_id} but the model's "
            f"vocabulary (embeddings.word_embeddings rows) has {config.vocab_size}: the "
            "tokenizer does not belong to these weights"
        )


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtypes(state: Mapping[str, torch.Tensor], where: str) -> None:
    wrong = [
        f"{name} ({_dtype(t.dtype)})"
        for name, t in sorted(state.items())
        if t.dtype not in FLOAT_DTYPES
    ]
    if wrong:
        accepted = ", ".join(_dtype(d) for d in FLOAT_DTYPES)
        raise InvalidArgument(
            f"{where}: weights must be floating point ({accepted}); these are not: {listed(wrong)}"
        )


def _check_names(
    expected: Mapping[str, list[int]], state: Mapping[str, torch.Tensor], where: str
) -> None:
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    problems = [f"missing tensors: {listed(missing)}"] if missing else []
    if unexpected:
        problems.append(f"tensors the model does not have: {listed(sorted(unexpected))}")
    if problems:
        raise InvalidArgument(
            f"{where} does not match the bert model its config describes ("
            + "; ".join(problems)
            + ")"
        )


def _check_shapes(
    expected: Mapping[str, list[int]], state: Mapping[str, torch.Tensor], where: str
) -> None:
    wrong = [
        f"{name} is {list(state[name].shape)}, the config gives {shape}"
        for name, shape in expected.items()
        if list(state[name].shape) != shape
    ]
    if wrong:
        raise InvalidArgument(
            f"{where}: tensors of the wrong shape for the config: {listed(wrong)}"
        )


def _check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """NaN or infinite weights load and serve, answering NaN for every input."""
    wrong = [name for name, t in sorted(state.items()) if not bool(torch.isfinite(t).all())]
    if wrong:
        raise InvalidArgument(f"{where}: weights hold NaN or infinite values: {listed(wrong)}")


def check_weights(config: BertConfig, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights that cannot build the model: the module comes from the zoo's builder as
    inference builds it (on the meta device: nothing allocated) and the state must load into
    it strictly. ``where`` names the weights in errors."""
    _check_dtypes(state, where)
    _check_finite(state, where)
    module = zoo.build_skeleton(ARCH, zoo.config_to_dict(config))
    expected = {name: list(t.shape) for name, t in module.state_dict().items()}
    _check_names(expected, state, where)
    _check_shapes(expected, state, where)
    try:
        module.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as exc:  # anything the checks above do not foresee
        raise InvalidArgument(
            f"{where} does not load into the bert model its config describes: {exc}"
        ) from None
