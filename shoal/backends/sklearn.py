"""The ``sklearn`` backend: a fitted scikit-learn estimator saved with joblib.

Tensors, when the spec declares none:

- input ``input`` (or the name of the spec's first declared input): FP32 ``[-1, n_features_in_]``;
- output ``label``: ``estimator.predict(X)``, INT64 when the classes are integers, else
  BYTES (UTF-8 of each label);
- output ``probabilities``: ``predict_proba(X)`` as FP32 ``[-1, n_classes]``, when the
  estimator has ``predict_proba``;
- a classifier fitted on ``k`` targets at once (``classes_`` a list, as a
  RandomForestClassifier fitted on a matrix of labels has) gives ``label`` ``[-1, k]`` and
  ``probabilities`` ``[-1, k, n_classes]`` (rows, targets, classes), the latter only when
  every target has the same number of classes;
- an estimator without ``classes_`` (a regressor) gives ``prediction``: FP32 ``[-1]``
  (``[-1, n_outputs_]`` for several targets) instead of the two above.

A spec that declares its outputs gets those: declaring ``label`` alone spares every call
the ``predict_proba`` (for a LogisticRegression pipeline, as much work again as ``predict``).

With ``multiplexing`` in the spec, ``model`` names a folder and model id ``ID`` is the file
``<model>/ID.joblib`` (the id is a plain name, never a path); an id without a file is
NotFound. With ``allowed_model_dirs`` set, an id whose file is a link to a file outside
those folders is PermissionDenied, naming the id but neither path (the client naming an id
need not be who deploys; the replica's log has both). The tensors are as above, per model.

An input the estimator refuses (scikit-learn raises ValueError: NaN where the estimator
takes none, say) is the client's error: INVALID_ARGUMENT / 400 ``the model refused the
input: ...``. Anything else the estimator raises is INTERNAL / 500 ``model raised ...``.

joblib files are pickles: loading one runs code from it. Serve only files you trust.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import joblib
import numpy as np

from shoal.backends.base import Backend, Tensors
from shoal.core import model_dirs
from shoal.core.limits import error_text
from shoal.core.spec import DeploymentSpec, TensorSpec, check_model_id
from shoal.errors import Internal, InvalidArgument, NotFound, PermissionDenied

log = logging.getLogger("shoal.replica")


def _to_bytes(values: np.ndarray) -> np.ndarray:
    encoded = [v if isinstance(v, bytes) else str(v).encode() for v in values.flat]
    out = np.empty(len(encoded), dtype=object)
    out[:] = encoded
    return out.reshape(values.shape)


def _prediction_shape(estimator: Any) -> tuple[int, ...]:
    """A regressor's answer: ``[-1]``, or ``[-1, n]`` for one fitted on ``n`` targets at once.
    Trees and ensembles say ``n_outputs_``; linear models have one row of ``coef_`` per target
    when fitted on a matrix (before, a LinearRegression of 2 targets was declared ``[-1]`` and
    answered ``[-1, 2]``)."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    n_outputs = getattr(final, "n_outputs_", None)
    if n_outputs is not None:
        return (-1,) if int(n_outputs) == 1 else (-1, int(n_outputs))
    coef = getattr(final, "coef_", None)
    if coef is not None and np.ndim(coef) == 2:
        return (-1, int(np.shape(coef)[0]))
    return (-1,)


class SklearnBackend(Backend):
    """Serves ``spec.model_path()``, a joblib file holding a fitted estimator or pipeline."""

    inline_calls = True  # short calls run on the event loop (Backend.run_sync)

    def __init__(self, spec: DeploymentSpec) -> None:
        super().__init__(spec)
        self._estimator: Any = None
        self._n_features: int | None = None
        self._integer_labels = False
        self._is_classifier = False
        self._targets = 0  # a classifier fitted on several targets at once: how many
        self._has_proba = False
        self._model_id = ""  # set on the backend of one model id of a multiplexed deployment

    @property
    def input_name(self) -> str:
        return self.spec.inputs[0].name if self.spec.inputs else "input"

    def model_backend(self, model_id: str) -> Backend:
        if self.spec.multiplexing is None:
            return super().model_backend(model_id)
        path = self.spec.model_path() / f"{check_model_id(model_id)}.joblib"
        backend = SklearnBackend(self.spec.model_copy(update={"model": str(path), "multiplexing": None}))
        backend._model_id = model_id
        backend.allowed_dirs = self.allowed_dirs
        return backend

    def check_exists(self) -> None:
        if self._model_id and not self.spec.model_path().is_file():
            raise self._missing()

    def _missing(self) -> NotFound:
        return NotFound(
            f"model id {self._model_id!r}: no file {self.spec.model_path().name} in the deployment's folder"
        )

    def _load(self) -> None:
        path = self.spec.model_path()
        if self.spec.multiplexing is not None:
            if not path.is_dir():
                raise InvalidArgument(f"sklearn model folder {str(path)!r} (multiplexing) does not exist")
            return
        if not path.is_file():
            if self._model_id:
                raise self._missing()
            raise InvalidArgument(f"sklearn model file {str(path)!r} does not exist")
        try:
            # Checked as it is opened, not before: the replica's check of the spec's file
            # never saw a model id's file, which a link could take outside allowed_dirs.
            file = model_dirs.open_inside(path, self.allowed_dirs)
        except model_dirs.OutsideAllowed as err:
            if not self._model_id:
                raise
            log.warning("model id %r refused: %s", self._model_id, err.message)
            raise PermissionDenied(
                f"model id {self._model_id!r}: its file {path.name} is outside the folders models "
                "may come from (setting allowed_model_dirs)"
            ) from None
        except OSError as err:
            raise InvalidArgument(f"cannot open {str(path)!r}: {err.strerror}") from err
        try:
            with file:
                estimator = joblib.load(file)
        except Exception as err:
            why = error_text(err)
            raise InvalidArgument(f"cannot load {str(path)!r} with joblib: {why}") from err
        if not callable(getattr(estimator, "predict", None)):
            raise InvalidArgument(f"{str(path)!r} holds a {type(estimator).__name__}, which has no predict()")

        n_features = getattr(estimator, "n_features_in_", None)
        self._n_features = int(n_features) if n_features is not None else None
        classes = getattr(estimator, "classes_", None)
        self._is_classifier = classes is not None
        self._has_proba = self._is_classifier and callable(getattr(estimator, "predict_proba", None))
        self._estimator = estimator

        self._derived_inputs = (
            TensorSpec(name=self.input_name, datatype="FP32", shape=(-1, self._n_features or -1)),
        )
        if self._is_classifier:
            # Fitted on several targets at once: a list of class arrays, one per target.
            per_target = (
                [np.asarray(c) for c in classes] if isinstance(classes, list) else [np.asarray(classes)]
            )
            self._targets = len(per_target) if isinstance(classes, list) else 0
            self._integer_labels = all(c.dtype.kind in "iub" for c in per_target)
            label_type = "INT64" if self._integer_labels else "BYTES"
            targets = (self._targets,) if self._targets else ()
            outputs = [TensorSpec(name="label", datatype=label_type, shape=(-1, *targets))]
            n_classes = {len(c) for c in per_target}
            if self._has_proba and len(n_classes) > 1:
                # predict_proba gives one (rows, classes) array per target: no one tensor.
                log.info("%s: its targets have different numbers of classes: no probabilities", path)
                self._has_proba = False
            if self._has_proba:
                shape = (-1, *targets, n_classes.pop())
                outputs.append(TensorSpec(name="probabilities", datatype="FP32", shape=shape))
            self._derived_outputs = tuple(outputs)
        else:
            shape = _prediction_shape(estimator)
            self._derived_outputs = (TensorSpec(name="prediction", datatype="FP32", shape=shape),)
        # A spec that declares its outputs without ``probabilities`` does not pay for
        # predict_proba on every call (as much again as predict, for a LogisticRegression).
        self._want_proba = self._has_proba and any(t.name == "probabilities" for t in self.outputs())

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        # Before the generic check: a feature count is clearer than a shape to someone
        # who trained the model.
        x = inputs.get(self.input_name)
        if x is not None:
            if x.ndim != 2:
                want = f"[-1, {self._n_features if self._n_features is not None else -1}]"
                shape = "[" + ", ".join(str(d) for d in x.shape) + "]"
                raise InvalidArgument(
                    f"input {self.input_name!r}: expected a matrix {want} (rows x features), got {shape}"
                )
            if self._n_features is not None and x.shape[1] != self._n_features:
                raise InvalidArgument(
                    f"input {self.input_name!r}: expected {self._n_features} features, got {x.shape[1]}"
                )
        super().check_inputs(inputs)

    async def _predict(self, inputs: Tensors) -> Tensors:
        return await self.run_sync(self._predict_blocking, inputs[self.input_name])

    def _blocking(self, inputs: Tensors) -> tuple[Callable[..., Tensors], tuple[Any, ...]] | None:
        return self._predict_blocking, (inputs[self.input_name],)

    def _predict_blocking(self, x: np.ndarray) -> Tensors:
        if len(x) == 0:
            # No rows: each output with none (scikit-learn refuses 0 samples), as the
            # model answers a batch of n rows with n.
            return self._no_rows()
        estimator = self._estimator
        try:
            predicted = np.asarray(estimator.predict(x))
            proba = estimator.predict_proba(x) if self._want_proba else None
            if proba is not None:
                # Several targets: a list of (rows, classes) arrays, target first; rows first
                # on the wire, as the batcher cuts them (taken as they were, a batch of two
                # 1-row requests answered each with the two rows of one target).
                proba = np.stack(proba, axis=1) if self._targets else proba
                proba = np.asarray(proba, dtype=np.float32)
        except ValueError as err:
            # scikit-learn's answer to input it does not take (NaN or infinity where the
            # estimator has no way to handle them, values a transformer never saw): the
            # client's to fix, so 400 / INVALID_ARGUMENT, not a server error. In a dynamic
            # batch it fails alone: the batcher runs a failed batch's requests again singly.
            raise InvalidArgument(f"the model refused the input: {err}") from err
        except Exception as err:
            raise Internal(f"model raised {error_text(err)}") from err
        if not self._is_classifier:
            return {"prediction": predicted.astype(np.float32, copy=False)}
        label = predicted.astype(np.int64, copy=False) if self._integer_labels else _to_bytes(predicted)
        outputs = {"label": label}
        if proba is not None:
            outputs["probabilities"] = proba
        return outputs

    def _no_rows(self) -> Tensors:
        outputs: dict[str, np.ndarray] = {}
        for t in self._derived_outputs:
            if t.name == "probabilities" and not self._want_proba:
                continue
            if t.name == "label" and not self._integer_labels:
                outputs[t.name] = np.empty((0, *t.shape[1:]), dtype=object)
                continue
            dtype = np.int64 if t.datatype == "INT64" else np.float32
            outputs[t.name] = np.empty((0, *t.shape[1:]), dtype=dtype)
        return outputs

    def _unload(self) -> None:
        self._estimator = None
