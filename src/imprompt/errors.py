"""Typed errors: part of imprompt's interface.

Every error imprompt raises on purpose derives from `ImpromptError`. Messages name the thing, what was
expected, what was found, and how to fix it; the CLI prints them as they are and the server returns the same
text with a 4xx status (see `http_status`), or 500 where the fault is not the client's (`InterruptedRunError`).
"""

from __future__ import annotations

import re
import reprlib

SHOWN = 60  # characters of a client's value that an error message repeats
SHORT = reprlib.Repr()  # containers: their first items, nested two deep
SHORT.maxlevel, SHORT.maxstring, SHORT.maxother, SHORT.maxlist, SHORT.maxdict = 2, SHOWN, SHOWN, 6, 4


def shown(value, limit: int = SHOWN) -> str:
    """A value a client sent, as an error message repeats it: its repr, cut after `limit` characters with its
    length said (`'AAAA...'... (1000000 characters)`), so a 1 MB string does not come back in a 1 MB answer. repr
    also escapes what UTF-8 cannot carry (a lone surrogate)."""
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
        unit = "characters" if isinstance(value, str) else "bytes"
        return text if len(value) <= limit else f"{text[:limit + 1]}... ({len(value)} {unit})"
    text = SHORT.repr(value)
    size = f" ({len(value)} items)" if isinstance(value, (list, tuple, dict, set)) and len(value) > 6 else ""
    return (text if len(text) <= 2 * limit else text[: 2 * limit] + "...") + size


def renamed(exc: ImpromptError, message: str) -> ImpromptError:
    """`exc` with another message (the part of the request it concerns named first, as the client sent it): the
    same type, so the same status, whatever its constructor takes (`CheckpointError` takes a path and a problem)."""
    new = type(exc).__new__(type(exc), message)  # not its __init__: the message is made already
    new.__dict__.update(exc.__dict__)
    new.args = (message,)
    return new


LONG_RUN = re.compile(r"\S{300,}")  # base64, a pasted file: nothing a message needs in full


def bounded(message: str, limit: int = 4000) -> str:
    """A message as the HTTP API answers it, whatever value it repeats: any run of 300 characters without a space
    cut as `shown` cuts values, the whole kept under `limit` characters (its end, where the fix is, kept), and what
    UTF-8 cannot carry escaped. The safety net behind `shown` for the messages that repeat a value in full."""
    message = LONG_RUN.sub(lambda m: f"{m.group()[:SHOWN]}... ({len(m.group())} characters)", message)
    if len(message) > limit:
        tail = limit // 5
        message = f"{message[: limit - tail]} ... ({len(message) - limit} characters cut) ... {message[-tail:]}"
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class ImpromptError(Exception):
    """Base class. `http_status` is the status the HTTP API answers with."""

    http_status = 400


class RequestError(ImpromptError):
    """A value in the request is invalid (range, type, missing field)."""

    http_status = 422


class ImageError(RequestError):
    """An input image cannot be read or decoded."""


class ImageTooLargeError(ImageError):
    """An input image exceeds the byte or pixel limits (checked before its pixels are decoded)."""

    http_status = 413


class PayloadTooLargeError(ImpromptError):
    """A request body over the server's size limit."""

    http_status = 413


class LimitError(ImpromptError):
    """A request over one of the engine's or server's count limits (units, images per unit)."""

    http_status = 413


class QueueFullError(ImpromptError):
    """The server's job queue is full; try again later."""

    http_status = 429


class InterruptedRunError(ImpromptError):
    """A request interrupted inside a batched pipeline call that then failed: nothing it made was kept (the call's
    error is its cause). Not the client's fault: 500."""

    http_status = 500


class AuthError(ImpromptError):
    """Missing or wrong API key."""

    http_status = 401


class CrossSiteError(ImpromptError):
    """A request from a web page of another site (its Origin), or for a host name the server does not answer to (a
    DNS-rebinding page): refused, so a page the user visits cannot use the API through the user's browser."""

    http_status = 403


class NotFoundError(ImpromptError):
    """A named model, adapter or encoder does not exist in the model store."""

    http_status = 404


class MethodNotAllowedError(ImpromptError):
    """An HTTP endpoint called with a method it does not take."""

    http_status = 405


class UnknownModelError(NotFoundError):
    pass


class UnknownAdapterError(NotFoundError):
    pass


class UnknownEncoderError(NotFoundError):
    pass


class UnknownEmbeddingsError(NotFoundError):
    pass


class UnknownLoraError(NotFoundError):
    pass


class UnknownVaeError(NotFoundError):
    pass


class UnknownControlNetError(UnknownModelError):
    """A ControlNet named by a request is not in the models folders."""


class MissingPartError(UnknownModelError):
    """A transformer alone (ComfyUI's split layout) lacks a part it runs with (its VAE, a text encoder): none named
    in the request, and none in the models folders fits."""


class IncompatibleError(ImpromptError):
    """Two things that must fit together do not (adapter vs UNet, adapter vs encoder)."""

    http_status = 422


class MissingEncoderError(ImpromptError):
    """No image encoder in the model store produces the output an adapter consumes."""

    http_status = 422


class MissingFaceAnalysisError(ImpromptError):
    """FaceID from images needs InsightFace (the optional `faceid` extra) and its model pack; one is missing."""

    http_status = 422


class UnknownPreprocessorError(RequestError):
    """A ControlNet unit names a preprocessor (module) imprompt does not know."""


class MissingPreprocessorWeightsError(ImpromptError):
    """A preprocessor's model weights are in none of the folders where users keep them; checked before any load."""

    http_status = 422


class MissingTokenizerError(ImpromptError):
    """A checkpoint whose text encoder's tokenizer is in no file imprompt can find (T5's, for single files)."""

    http_status = 422


class NoFaceError(RequestError):
    """A FaceID reference image in which the face detector found no face."""


class UnsupportedError(ImpromptError):
    """A recognised checkpoint that imprompt cannot run (yet), e.g. FaceID adapters."""

    http_status = 422


class CheckpointError(ImpromptError):
    """A file on disk is not what it should be: corrupt, truncated, a directory, or not a checkpoint we know."""

    http_status = 422

    def __init__(self, path, problem: str, fix: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}"
        if fix:
            message += f". {fix}"
        super().__init__(message)

    def __reduce__(self):
        """Pickled with its own arguments: a cluster worker's error reaches the ingress as itself (Ray pickles it)."""
        return type(self), (self.path, self.problem, self.fix)


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint that carries code or objects other than tensors; it was not executed."""
