"""Error codes of the worker protocol, and the exception that carries one to the caller."""

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
MODEL_NOT_LOADED = 1001
MODEL_LOAD_FAILED = 1002
INVALID_REQUEST_PARAMS = 1003
OVERLOADED = 1004
SHUTTING_DOWN = 1005
ENGINE_FAILURE = 1006


class RpcError(Exception):
    """A JSON-RPC error object: `code`, `message` and, for invalid params, `data`."""

    def __init__(self, code: int, message: str, data=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalid_params(detail: str) -> RpcError:
    """A -32602 error; `detail` names the field."""
    return RpcError(INVALID_PARAMS, "Invalid params", detail)


def invalid(message: str) -> RpcError:
    """A well-formed request the worker refuses (1003)."""
    return RpcError(INVALID_REQUEST_PARAMS, message)
