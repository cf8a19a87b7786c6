"""Malformed input gets JSON-RPC errors (never anything else on stdout) and the worker serves on."""

import pytest


def still_works(w):
    assert w.result("handshake", {})["protocol_version"].startswith("1.")


@pytest.mark.parametrize("line,code", [
    (b'{"jsonrpc": "2.0", "id": 1, "method": ', -32700),
    (b"not json at all", -32700),
    (b'[{"jsonrpc": "2.0", "id": 1, "method": "stats"}]', -32600),
    (b"[]", -32600),
    (b'{"jsonrpc": "2.0", "method": "stats"}', -32600),
    (b"42", -32600),
    (b'"a string"', -32600),
    (b'{"id": 9, "method": "stats"}', -32600),
    (b'{"jsonrpc": "1.0", "id": 9, "method": "stats"}', -32600),
    (b'{"id": \xff\xfe}', -32600),
])
def test_malformed_lines_get_errors_and_the_next_request_works(shared, line, code):
    shared.send_bytes(line + b"\n")
    if b'"id": 9' in line:
        err = shared.response(9)["error"]
    else:
        err = shared.null_id_error()
    assert err["code"] == code, (line, err)
    assert isinstance(err["message"], str) and err["message"]
    still_works(shared)


def test_a_line_over_the_limit_is_refused_naming_the_limit(start):
    w = start("--max-line-bytes", "65536")
    huge = b'{"jsonrpc":"2.0","id":5,"method":"stats","params":{"pad":"' + b"x" * (1 << 20) + b'"}}\n'
    w.send_bytes(huge)
    err = w.null_id_error()
    assert err["code"] == -32600 and "65536" in err["message"], err
    still_works(w)
    # A line just under the limit is read normally.
    w.send_bytes(b'{"jsonrpc":"2.0","id":6,"method":"stats","params":{"pad":"' + b"x" * 60000 + b'"}}\n')
    assert "result" in w.response(6)


def test_blank_lines_are_ignored(shared):
    shared.send_bytes(b"\n  \n")
    still_works(shared)
