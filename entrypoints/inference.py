"""SageMaker inference handler: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

Works in three places:
* in the repository, as ``entrypoints/inference.py`` (``import entrypoints.inference``);
* in a SageMaker ``model.tar.gz`` as ``code/inference.py`` next to a vendored ``code/twotower_lit/``
  (the inference toolkit puts ``code/`` on ``sys.path``);
* loaded by path from anywhere else: the repository root is then added to ``sys.path``.

Settings come from ``TWOTOWER_<FIELD>`` environment variables of `ServeConfig` (e.g.
``TWOTOWER_NUM_THREADS``, default 1 compute thread per worker; ``TWOTOWER_MAX_K``).
Client errors become 4xx: under the inference toolkit they are raised as its
``BaseInferenceToolkitError`` (anything else would be answered with 500). Every error body is our
JSON error alone: the toolkit's own error answer (`Transformer.handle_error`) appends a Python
traceback to it, and answers a body it cannot decode as UTF-8 (it decodes JSON and CSV before
``input_fn``) with 500, so this module installs `answer_error` in its place.
"""
from __future__ import annotations

import dataclasses
import http
import importlib.util
import logging
import os
import sys

if importlib.util.find_spec("twotower_lit") is None:  # loaded by path from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twotower_lit.serving import handler  # noqa: E402
from twotower_lit.serving.errors import RequestError  # noqa: E402

try:
    from sagemaker_inference.errors import BaseInferenceToolkitError
    from sagemaker_inference.transformer import Transformer
except ImportError:  # our own server, or a container without the toolkit
    BaseInferenceToolkitError = Transformer = None

log = logging.getLogger("twotower_lit.serving.inference")

if BaseInferenceToolkitError is not None:
    class ToolkitRequestError(RequestError, BaseInferenceToolkitError):
        """A RequestError the toolkit answers with its own status (and our JSON as the message)."""

        def __init__(self, err: RequestError) -> None:
            RequestError.__init__(self, err.status, err.field, err.detail)
            # what the toolkit answers with: this status, our JSON error as the body
            self.status_code, self.message, self.phrase = err.status, err.body().decode("utf-8"), str(err)


def _undecodable_body(exc: BaseException) -> bool:
    """A UnicodeDecodeError raised by the toolkit's own decoding of the request body."""
    if not isinstance(exc, UnicodeDecodeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "transform" and "sagemaker_inference" in \
        tb.tb_frame.f_code.co_filename


def answer_error(context, inference_exception, trace):
    """`Transformer.handle_error` for this model: the status and our JSON error, no traceback (it
    goes to the log for a server error)."""
    exc = sys.exc_info()[1]
    if isinstance(exc, RequestError):
        err = exc
    elif _undecodable_body(exc):
        err = RequestError(400, "body", f"not valid UTF-8 (byte {exc.start})")
    else:
        log.error("invocation failed:\n%s", trace)
        status = getattr(inference_exception, "status_code", 500)
        err = RequestError(status, "server", "internal error while serving the request; see the endpoint's log")
    try:
        phrase = http.HTTPStatus(err.status).phrase
    except ValueError:
        phrase = "Error"
    context.set_response_status(code=err.status, phrase=phrase)
    context.set_response_content_type(0, "application/json")
    return [err.body().decode("utf-8")]


if Transformer is not None and hasattr(Transformer, "handle_error"):
    Transformer.handle_error = staticmethod(answer_error)

_CONFIG = None


def _config():
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = handler.config_from_env()
    return _CONFIG


def _client_error(err: RequestError) -> Exception:
    return err if BaseInferenceToolkitError is None else ToolkitRequestError(err)


def model_fn(model_dir):
    """Verify checksums and load the exported model in ``model_dir`` (no pickle, no torchrec)."""
    return handler.load_model(model_dir, _config())


def input_fn(input_data, content_type):
    try:
        return handler.decode(input_data, content_type, _config())
    except RequestError as e:
        raise _client_error(e) from None


def predict_fn(data, model):
    return handler.predict(data, model)


def output_fn(prediction, accept):
    try:
        return handler.encode(prediction, accept)
    except RequestError as e:
        raise _client_error(e) from None


def main(argv=None) -> int:
    """``python -m entrypoints.inference --help``: what this module is for and the environment
    variables it reads (it is imported by a serving container, not run)."""
    import argparse

    from twotower_lit.config import ServeConfig
    from twotower_lit.options import OneLineHelpFormatter, iter_fields, option_name

    settings = []
    for _, f, _ in iter_fields(ServeConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default is None else f" (default: {default})"
        settings.append(f"  {handler.ENV_PREFIX}{option_name(f).upper()}: {f.metadata.get('help', '')}{shown}")
    parser = argparse.ArgumentParser(
        prog="python -m entrypoints.inference", formatter_class=OneLineHelpFormatter,
        description=__doc__,
        epilog="Settings (environment variables; SM_MODEL_DIR gives the model directory):\n" + "\n".join(settings)
        + "\n\nTo serve a model locally with the same handler functions: python -m entrypoints.serve --help")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

