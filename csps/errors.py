"""User-facing errors: the CLI and the server turn these into one clear line / a 4xx, never a traceback."""


class CspsError(Exception):
    """A problem with the user's input or setup, with a message that says what to do."""


class ModelLoadError(CspsError):
    pass


class RequestError(CspsError):
    """A request that cannot be served as asked (too long, bad parameter); ``param`` names the request
    field at fault, when there is one (the server reports it as the error's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
