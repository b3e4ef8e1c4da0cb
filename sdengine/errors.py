"""The engine's exception tree. Every message is one sentence a user can act on.

SDEngineError
├── InvalidRequest     bad prompt, parameter or image: the user must change the request
├── ModelLoadError     the model source is unreachable, missing or malformed
├── Cancelled          the request was cancelled between steps
└── OutOfMemory        the device ran out of memory for this request
"""


class SDEngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequest(SDEngineError, ValueError):
    """The request cannot run as given; the message says what to change."""


class ModelLoadError(SDEngineError):
    """The model could not be loaded; the message says what to do instead."""


class Cancelled(SDEngineError):
    """The request was cancelled."""


class OutOfMemory(SDEngineError):
    """The device ran out of memory even for this request alone."""
